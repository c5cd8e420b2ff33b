"""Where the project's data lives: the repository root (LLMBENCH_ROOT overrides)."""
import os
from pathlib import Path

ROOT = Path(os.environ.get("LLMBENCH_ROOT") or Path(__file__).resolve().parents[3])
DATA = ROOT / "data"
MODELS = DATA / "models"
GRIDS = DATA / "grids"
RUNS = DATA / "runs"
NOTEBOOKS = ROOT / "notebooks"
PROMPTS = DATA / "prompts" / "zh.jsonl"
DEVICES_SPEC = DATA / "devices.yaml"
CLAIMS = DATA / "claims.yaml"
PUBLISHED = DATA / "published.yaml"  # published figures and latency targets, with sources
