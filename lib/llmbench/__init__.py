"""llmbench: measured inference efficiency of Llama 3.2 1B vs 3B on Ascend NPU, CUDA or CPU.

Data flow: data/grids/*.yaml -> runner -> papermill runs notebooks/NN_*.ipynb per grid point ->
data/runs/<grid>/<run_id>/{records.parquet, run.json, notebook} -> notebooks/99_report.ipynb ->
figures/ and report/index.html.
"""
__version__ = "0.1.0"
