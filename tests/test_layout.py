"""The package's shape: imports flow one way (CLI -> experiments, serving, bench -> training ->
evaluation -> run -> method, loaders, kernels -> config), no module imports the CLI, no import
cycle (imports inside functions count), every allowed-value list has one home, and the device
check's smoke step imports every module."""

import ast
from pathlib import Path

import ecvl_fast

ROOT = Path(ecvl_fast.__file__).resolve().parent.parent
# where each part lives: a lower layer never imports a higher one
LAYERS = {
    "ecvl_fast": 0,
    "ecvl_fast.config": 0,
    "ecvl_fast.recipes": 0,
    "ecvl_fast.kernels": 1,
    "ecvl_fast.loaders": 1,
    "ecvl_fast.method": 1,
    "ecvl_fast.run": 2,
    "ecvl_fast.evaluation": 3,
    "ecvl_fast.training": 4,
    "ecvl_fast.serving": 5,
    "ecvl_fast.bench": 6,
    "ecvl_fast.experiments": 6,
    "ecvl_fast.cli": 7,
}
FOLDERS = {"ecvl_fast.kernels": ROOT / "kernels", "ecvl_fast.loaders": ROOT / "loaders"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "ecvl_fast").rglob("*.py")):
        if path.name == "cli.py":
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for package, folder in FOLDERS.items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    out["ecvl_fast.cli"] = ROOT / "cli.py"
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ecvl_fast"):
            for a in node.names:  # `from ecvl_fast.run import dist` names the module ecvl_fast.run.dist
                found.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ecvl_fast")}
    return found


def layer(module: str) -> int:
    return max(v for k, v in LAYERS.items() if module == k or module.startswith(k + "."))


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) & set(mods) - {m} for m, p in mods.items()}


def test_imports_flow_one_way_and_no_module_imports_the_cli():
    edges = graph()
    assert len(edges) > 30 and "ecvl_fast.serving.classifier" in edges
    wrong = [(a, b) for a, bs in edges.items() for b in bs if layer(b) > layer(a)]
    assert not wrong, f"imports against the layers: {wrong}"
    assert not [a for a, bs in edges.items() if "ecvl_fast.cli" in bs]


def test_no_import_cycle():
    edges, state, cycle = graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycle.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycle, f"import cycles: {cycle}"


def test_every_allowed_value_list_has_one_home():
    """The config's choices are the lists the code checks against, not copies of them."""
    from ecvl_fast.config import CHOICES
    from ecvl_fast.kernels import bank
    from ecvl_fast.loaders.convert import DATASETS
    from ecvl_fast.method.rows import DEFAULT_ROWS, ROWS
    from ecvl_fast.run.precision import DTYPES

    assert (bank.NORMS, bank.SCOPES, bank.DIRECTIONS) == tuple(
        CHOICES["aug", k] for k in ("m_norm", "m_scope", "m_direction")
    )
    assert all(
        a is CHOICES["aug", k]
        for a, k in ((bank.NORMS, "m_norm"), (bank.SCOPES, "m_scope"), (bank.DIRECTIONS, "m_direction"))
    )
    assert set(CHOICES["run", "precision"]) == {"auto", *DTYPES}
    assert {r.aug["m_source"] for r in ROWS.values()} <= set(CHOICES["aug", "m_source"])
    assert set(DEFAULT_ROWS) <= set(ROWS)
    from typer.main import get_command

    from ecvl_fast.cli import app

    params = {p.name: p for p in get_command(app).commands["convert"].params}
    assert params["dataset"].help == " | ".join(DATASETS)
    params = {p.name: p for p in get_command(app).commands["ablate"].params}
    assert params["rows"].default == ",".join(DEFAULT_ROWS)


def test_the_smoke_step_imports_every_module():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("smoke", ROOT / ".ci" / "smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    sys.modules.pop("smoke", None)
    spec.loader.exec_module(smoke)
    ours = {m for m in modules() if m not in ("ecvl_fast.kernels.cuda",)}
    missing = {
        m
        for m in ours
        if not m.endswith(("__init__",))
        and m.count(".") > 0
        and m not in smoke.MODULES
        and not any(m == k for k in LAYERS if k.count(".") == 1 and k not in ("ecvl_fast.config", "ecvl_fast.cli"))
    }
    missing -= {
        "ecvl_fast.loaders.convert",
        "ecvl_fast.loaders.ffcv_loader",
        "ecvl_fast.loaders.sources",
        "ecvl_fast.kernels.formulas",
    }  # need ffcv, or are imported by what the smoke step imports
    assert not missing, f"modules the device check's smoke step does not import: {sorted(missing)}"
