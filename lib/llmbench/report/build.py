"""Build the report: papermill runs notebooks/99_report.ipynb over a results folder, then nbconvert
renders it to one self-contained HTML file with the code hidden and nothing loaded from the network."""
import os
from pathlib import Path

from llmbench.core import paths
from llmbench.core.errors import UserError
from llmbench.core.files import atomic_write
from llmbench.system.nbexec import KERNEL, check_kernel

TEMPLATES = Path(__file__).parent / "template"


def to_html(notebook_path: Path, html_path: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter
    exporter = HTMLExporter(template_name="offline", extra_template_basedirs=[str(TEMPLATES)],
                            exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(notebook_path, as_version=4))
    atomic_write(html_path, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))
    os.chmod(html_path, 0o644)  # mkstemp made it 0600: a web server running as another user must read it


def build(results_dir, figures_dir="figures", html_path="report/index.html") -> Path:
    import papermill

    results = Path(results_dir).resolve()
    if not results.is_dir():
        raise UserError(f"results folder {str(results_dir)!r} does not exist; run a grid first "
                        f"(e.g. llmbench run data/grids/smoke.yaml), or give one of: "
                        f"{', '.join(sorted(str(p.relative_to(paths.ROOT)) for p in paths.RUNS.glob('*') if p.is_dir())) or 'none'}")
    check_kernel()
    html_path = Path(html_path).resolve()
    html_path.parent.mkdir(parents=True, exist_ok=True)
    executed = html_path.with_name("99_report.ipynb")
    papermill.execute_notebook(str(paths.NOTEBOOKS / "99_report.ipynb"), str(executed), kernel_name=KERNEL,
                               parameters={"results_dir": str(results), "figures_dir": str(Path(figures_dir).resolve())},
                               progress_bar=False, cwd=str(paths.ROOT))
    to_html(executed, html_path)
    return html_path
