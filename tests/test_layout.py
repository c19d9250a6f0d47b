"""The two layers: the stage and tool scripts import only the library, never each other, and the
library (data/ and judges/ included) never imports a script. Imports inside functions count too."""

import ast
import glob
import os

from conftest import ROOT

SCRIPTS = {"sft", "reward", "ppo", "dpo", "sample", "label", "rate", "eval", "plot"}
LIBRARY = {"model", "common", "rollout", "scoring", "losses", "kernels", "data", "judges"}


def imported(path):
    """The top-level names of every module a file imports."""
    tree = ast.parse(open(path).read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_top_level_file_is_a_script_or_the_library():
    top = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert top == SCRIPTS | (LIBRARY - {"kernels", "data", "judges"}), top ^ (SCRIPTS | LIBRARY)


def test_no_script_imports_another_script():
    for name in sorted(SCRIPTS):
        wrong = imported(os.path.join(ROOT, name + ".py")) & SCRIPTS
        assert not wrong, f"{name}.py imports the script(s) {sorted(wrong)}"


def test_the_library_imports_no_script():
    files = [os.path.join(ROOT, m + ".py") for m in ("model", "common", "rollout", "scoring", "losses")]
    for folder in ("data", "judges", "kernels", "scripts"):
        files += glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)
    assert len(files) > 10
    for path in files:
        wrong = imported(path) & SCRIPTS
        assert not wrong, f"{os.path.relpath(path, ROOT)} imports the script(s) {sorted(wrong)}"
