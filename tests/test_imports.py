"""The package's import graph runs one way: no circle, and only the command layer imports train.py."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "agcg_jax")
# The command layer: what `agcg COMMAND` runs. Only these may import the training loop.
COMMAND_LAYER = {"agcg_jax.cli", "agcg_jax.commands", "agcg_jax.bench", "agcg_jax.train"}


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict[str, set[str]]:
  """Module -> the agcg_jax modules it imports anywhere (top level or inside functions)."""
  modules = {}
  for dirpath, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        modules[_module_name(path)] = path
  graph = {}
  for mod, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        deps.add(node.module)
        deps |= {f"{node.module}.{a.name}" for a in node.names}
    graph[mod] = {d for d in deps if d in modules and d != mod}
  return graph


def _find_cycle(graph):
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == "open":
        return stack[stack.index(d):] + [d]
      if d not in state:
        found = visit(d)
        if found:
          return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_the_import_graph_has_no_circle():
  assert _find_cycle(import_graph()) is None, " -> ".join(_find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_planted_circle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
  assert _find_cycle(graph) == ["a", "b", "c", "a"]


def test_only_the_command_layer_imports_the_training_loop():
  importers = {m for m, deps in import_graph().items() if "agcg_jax.train" in deps}
  assert importers <= COMMAND_LAYER, importers - COMMAND_LAYER


def test_nothing_in_data_imports_the_nih_builder():
  graph = import_graph()
  importers = {m for m, deps in graph.items() if "agcg_jax.data.tfds_nih" in deps}
  assert not {m for m in importers if m.startswith("agcg_jax.data.")}, importers
