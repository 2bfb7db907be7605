"""MkDocs hook: the figures the pages embed from the committed benchmark records under bench/results/.

The records stay where `python -m bench` writes them; a top-level page embeds a plot by its repository
path (`bench/results/<run>/<plot>.png`), and this hook hands those images to the build so that the
site holds them at that same path. Only images are added; a record's tables are included into a page
by pymdownx.snippets (`--8<-- "bench/results/<run>/table.md:3"`).
"""
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def on_files(files, config):
    for png in sorted((ROOT / "bench" / "results").glob("*/*.png")):
        rel = png.relative_to(ROOT).as_posix()
        files.append(File.generated(config, rel, abs_src_path=str(png)))
    return files
