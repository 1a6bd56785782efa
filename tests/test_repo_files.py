"""The committed text files themselves: no merge left half done."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^(<{7}|={7}|>{7})( |$)", re.MULTILINE)


def test_no_merge_conflict_markers_in_tracked_text_files():
    files = subprocess.run(["git", "ls-files", "*.md", "*.py", "*.yaml", "*.toml", "*.cfg", "Makefile"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    assert files, "git ls-files found nothing"
    bad = [f"{f}:{text.count(chr(10), 0, m.start()) + 1}" for f in files if (ROOT / f).is_file()
           for text in [(ROOT / f).read_text(errors="replace")] for m in MARKER.finditer(text)]
    assert not bad, f"merge conflict markers: {bad}"
