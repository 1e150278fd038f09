"""The package's layering, read from the code's own imports (DESIGN.md section 3).

- No module imports a command module (what two commands share lives in the library).
- Inference (sampling, evaluation, data, the demo judges) never imports training (`fcdm_jax.train`).
- The library never imports the demo-only code, except the registries' lines that name
  the demo's source and judges.
- A project module imported inside a function says why on that line (a comment): only to
  defer a heavy optional dependency or to break a cycle.
- No test file imports another test file (shared code is in tests/helpers/).
- No command imports TensorFlow when it starts (seconds that `--help` and an early error
  need not wait for): the writers and TFDS sources import it when they are used.
"""

import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fcdm_jax"
COMMANDS = {"main", "sample", "evaluate", "extract_latents", "export_torch", "preflight",
            "preflight_table", "bench"}
INFERENCE = {"sampling", "evaluation", "data", "demo"}
# Registry lines may name demo-only members of an extension point.
DEMO_ALLOWED = {"data/registry.py", "evaluation/registry.py", "demo"}


def _imports(path: pathlib.Path):
  """(module imported, line, inside a function?) for every absolute import of `path`."""
  tree = ast.parse(path.read_text(), str(path))
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.Lambda))
      if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
        out.append((child.module, child.lineno, in_function))
        if child.module == "fcdm_jax":
          out.extend((f"fcdm_jax.{a.name}", child.lineno, in_function) for a in child.names)
        else:
          out.extend((f"{child.module}.{a.name}", child.lineno, in_function)
                     for a in child.names)
      elif isinstance(child, ast.Import):
        out.extend((a.name, child.lineno, in_function) for a in child.names)
      visit(child, nested)

  visit(tree, False)
  return out


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE)
    yield path, rel, (rel.parts[0].removesuffix(".py") if rel.parts else "")


def test_no_module_imports_a_command():
  bad = []
  for path, rel, top in _modules():
    for module, line, _ in _imports(path):
      parts = module.split(".")
      if parts[0] == "fcdm_jax" and len(parts) > 1 and parts[1] in COMMANDS and parts[1] != top:
        bad.append(f"{rel}:{line} imports the command module {module}")
  assert not bad, "\n".join(bad)


def test_inference_does_not_import_training():
  bad = [f"{rel}:{line} imports {module}"
         for path, rel, top in _modules() if top in INFERENCE
         for module, line, _ in _imports(path) if module.startswith("fcdm_jax.train")]
  assert not bad, "\n".join(bad)


def test_library_does_not_import_demo_code():
  bad = []
  for path, rel, top in _modules():
    if top in COMMANDS or top in DEMO_ALLOWED or str(rel) in DEMO_ALLOWED:
      continue
    bad += [f"{rel}:{line} imports {module}" for module, line, _ in _imports(path)
            if module.startswith("fcdm_jax.demo")]
  assert not bad, "\n".join(bad)


def test_project_imports_inside_functions_say_why():
  bad = []
  for path, rel, _ in _modules():
    lines = path.read_text().splitlines()
    for module, line, in_function in _imports(path):
      if in_function and module.startswith("fcdm_jax") and "#" not in lines[line - 1]:
        bad.append(f"{rel}:{line}: {lines[line - 1].strip()}")
  assert not bad, ("project modules imported inside functions without a reason; import "
                   "them at the top, or say why on the line:\n" + "\n".join(sorted(set(bad))))


def test_no_test_file_imports_another():
  bad = [f"{path.relative_to(REPO)}:{line} imports {module}"
         for path in sorted((REPO / "tests").rglob("*.py"))
         for module, line, _ in _imports(path) if module.split(".")[0].startswith("test_")]
  assert not bad, "\n".join(bad)


def test_commands_start_without_tensorflow():
  for command in ("main", "sample", "evaluate", "preflight"):
    code = (f"import sys, fcdm_jax.{command}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tensorflow_datasets', 'clu')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", (command, proc.stdout[-3000:])
