"""README.md, benchmarks/README.md and docs/*.md: every file they name and every link and image
they hold exists in the checkout."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_docs_name_only_files_that_exist():
    paths = r"\b((?:cluster|configs)/[\w./-]+\.(?:ya?ml|sbatch|md)|cluster/Dockerfile)\b"
    named = {doc: set(re.findall(paths, doc.read_text())) for doc in DOCS}
    assert {"cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay/raycluster.yaml",
            "cluster/slurm/tune.sbatch", "cluster/accelerate/multi_node.yaml"} <= named[ROOT / "README.md"]
    missing = sorted(f"{doc.name}: {p}" for doc, ps in named.items() for p in ps
                     if not (ROOT / p).exists())
    assert not missing


def test_docs_links_and_images_resolve():
    # Markdown links are relative to the file that holds them (docs/results.md
    # shows its plots as "x.png", README as "docs/x.png").
    broken = sorted(f"{doc.name}: {target}" for doc in DOCS
                    for target in re.findall(r"\]\(([^)#\s]+)\)", doc.read_text())
                    if "://" not in target and not (doc.parent / target).exists())
    assert not broken
