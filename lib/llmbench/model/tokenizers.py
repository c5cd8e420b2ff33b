"""Real tokenizers without a download: Llama 3's and Qwen's BPE files, as ordinary PyPI packages ship them.

- Llama 3 (used by Llama 3.x, including 3.2): `llama_models/llama3/tokenizer.model` of Meta's
  `llama-models` package. Pattern and special tokens as in that package's `llama3/tokenizer.py`:
  128,000 BPE ranks, then 256 special ids (<|begin_of_text|> = 128000, <|end_of_text|> = 128001, ...).
- Qwen: `dashscope/resources/qwen.tiktoken` of Alibaba's `dashscope` package. Pattern, NFC
  normalization and special tokens as in that package's `tokenizers/qwen_tokenizer.py` (and Qwen's
  `tokenization_qwen.py`): 151,643 BPE ranks, then <|endoftext|>, <|im_start|>, <|im_end|> and 205 extras.

Both files are read from the installed distributions (located through their metadata, so the packages'
own code, and their dependencies, are never imported) and checked against the sha256 in the wheel's
RECORD. tiktoken gets the ranks as a dict: it has no file name to fetch or cache.
"""
import base64
import hashlib
import importlib.metadata as md
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from llmbench.core.errors import UserError


@dataclass(frozen=True)
class Spec:
    package: str            # distribution that ships the file
    file: str               # path inside it
    pattern: str            # pre-tokenizer regex (tiktoken pat_str)
    special: tuple          # special tokens, numbered from the first id after the BPE ranks
    bos: str | None         # prepended by encode(add_special_tokens=True)
    nfc: bool               # NFC-normalize before encoding (Qwen does, Llama 3 does not)


_LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                   "<|image|>")
SPECS = {
    "llama3": Spec(
        package="llama_models", file="llama_models/llama3/tokenizer.model",
        pattern=r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        special=_LLAMA3_SPECIAL + tuple(f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_SPECIAL))),
        bos="<|begin_of_text|>", nfc=False),
    "qwen": Spec(
        package="dashscope", file="dashscope/resources/qwen.tiktoken",
        pattern=r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        special=("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205)),
        bos=None, nfc=True),
}
NAMES = tuple(SPECS)
# Meta's tokenizer splits longer inputs before encoding (tiktoken issue 195); our prompts are far shorter.
MAX_CHARS = 400_000


@dataclass
class Tokenizer:
    """A tiktoken encoding with the call the workload uses: encode(text, add_special_tokens=False)."""
    name: str               # llama3 | qwen
    source: str             # "<package> <version>: <file>"
    enc: object             # tiktoken.Encoding
    n_base: int             # BPE ranks; special ids follow
    special: dict           # special token -> id
    bos_token_id: int | None
    nfc: bool

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text. Special-token strings inside text are encoded as ordinary text."""
        if len(text) > MAX_CHARS:
            raise ValueError(f"text of {len(text):,} characters: split it below {MAX_CHARS:,} before encoding")
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ids = self.enc.encode_ordinary(text)
        return ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))


def _shipped_file(spec: Spec) -> tuple[bytes, str]:
    """The file's bytes, checked against the installed wheel's RECORD hash, and where it came from."""
    try:
        dist = md.distribution(spec.package)
    except md.PackageNotFoundError:
        raise UserError(f"the {spec.package} package (it ships {spec.file}) is not installed; "
                        "run `make setup` (it installs requirements-data.txt)") from None
    entry = next((f for f in dist.files or () if str(f) == spec.file), None)
    path = dist.locate_file(spec.file)
    if entry is None or not path.is_file():
        raise UserError(f"{spec.package} {dist.version} does not ship {spec.file}; "
                        "reinstall it from requirements-data.txt")
    data = path.read_bytes()
    if entry.hash is not None:
        algo, want = entry.hash.mode, entry.hash.value  # urlsafe base64 without padding (wheel RECORD format)
        got = base64.urlsafe_b64encode(hashlib.new(algo, data).digest()).rstrip(b"=").decode()
        if got != want:
            raise UserError(f"{path} does not match its {algo} in {spec.package}'s RECORD: reinstall {spec.package}")
    return data, f"{dist.metadata['Name']} {dist.version}: {spec.file}"


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """tiktoken's BPE file format: one `base64(token) rank` per line."""
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}


@lru_cache(maxsize=None)
def load(name: str = "llama3") -> Tokenizer:
    """The named tokenizer (llama3 | qwen), built from the installed package's file; loaded once per process."""
    import tiktoken
    if name not in SPECS:
        raise UserError(f"unknown tokenizer {name!r}; valid: {', '.join(NAMES)}")
    spec = SPECS[name]
    data, source = _shipped_file(spec)
    ranks = parse_ranks(data)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{source}: ranks are not 0..{len(ranks) - 1}; not a tiktoken BPE file")
    special = {tok: len(ranks) + i for i, tok in enumerate(spec.special)}
    enc = tiktoken.Encoding(name=f"{name}-shipped", pat_str=spec.pattern, mergeable_ranks=ranks,
                            special_tokens=special)
    return Tokenizer(name=name, source=source, enc=enc, n_base=len(ranks), special=special,
                     bos_token_id=special[spec.bos] if spec.bos else None, nfc=spec.nfc)


def label(tokenizer) -> str:
    """A short, stable name of a tokenizer for the records' `tokens` column."""
    if isinstance(tokenizer, Tokenizer):
        return f"{tokenizer.name} ({tokenizer.source.split(':')[0]})"
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
