"""The keys that identify a configuration: one list for run ids, record fields and report grouping.

A record is one metric of one configuration at one shape. CONFIG_KEYS say *what* ran (a new axis is
added here, once, and then shows in run ids, every record and every report table); SHAPE_KEYS say at
which input shape it was measured.
"""
CONFIG_KEYS = ("model", "weights", "dtype", "quant", "engine", "device", "tokens")
SHAPE_KEYS = ("batch", "prompt_len", "context_len", "new_tokens")

# Each record's `study`: which experiment notebook measured it. The report selects records by it, never by
# notebook file names.
STUDIES = {"00_device": "device", "01_latency": "latency", "02_batch_sweep": "batch_sweep",
           "03_quantization": "quantization", "04_serving": "serving", "05_pairs": "pairs"}

# The configuration keys a grid point names in its run id, in this order (device, weights and tokens
# are usually the same for a whole grid, so they are shown only when the grid sweeps them).
RUN_ID_KEYS = ("model", "dtype", "quant", "methods", "engine", "pair", "versus")


def config_of(row) -> tuple:
    """The configuration a record (dict or pandas row) belongs to."""
    return tuple(row.get(k) for k in CONFIG_KEYS)
