"""The Jupyter kernel every notebook runs in (registered by `make setup`)."""
import os

from llmbench.core.errors import UserError


KERNEL = os.environ.get("LLMBENCH_KERNEL", "llmbench")


def check_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        raise UserError(f"Jupyter kernel {KERNEL!r} is not registered; run `make setup` "
                        f"(or: python -m ipykernel install --sys-prefix --name {KERNEL})")
