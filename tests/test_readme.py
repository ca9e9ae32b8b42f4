"""The README's ```python blocks run, top to bottom, as one reader's session: an example nobody runs rots.

How the blocks are run (what a README editor needs to know):

* Every ```python block runs, in order, in one namespace, in a fresh
  subprocess whose working directory is an empty temporary directory, offline
  (connections to anything but this machine are refused) and with the suite's
  warning filters (``filterwarnings = error``). A traceback names README.md
  and the README's own line numbers.
* Where the prose assumes something the reader already has (a dataset, an
  optimizer, a model class), :data:`PRELUDES` defines it, keyed by the
  section's heading and run before the section's first block. Keep them small
  and plain: they stand in for the reader's code, never for weightbank's.
* A block that cannot run here says why in :data:`SKIPS` (keyed by a line of
  the block). The S3 sections run in their own test against the suite's S3
  server, with the README's endpoint rewritten to it.
* ``print(x)  # <python literal>``, with the literal on the same line or alone
  on the next comment line, is checked: what it prints must equal what the
  literal prints. A comment in prose (``# what it frees``) or one that is not
  a literal (ids differ per machine) is not checked. For a print of several
  values, ``# 10240 273448`` is read as one literal per value.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

PRELUDES: dict[str, str] = {
    "Lightning (`pip install 'weightbank[lightning]'`)": """
# Lightning 2.6 on torch 2.13 warns about deprecated pytree names and a loader without workers:
# its warnings, not weightbank's, so the suite's filterwarnings=error does not apply to them.
import warnings
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", module="lightning")
warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|litlogger).*")
""",
    "Training: CheckpointManager": """
# The reader's training set-up; the section's own bank, since run "tts" above holds plain state dicts.
tour_bank, bank = bank, wb.open("training-bank")
dataset = torch.utils.data.TensorDataset(torch.randn(256, 256), torch.randint(0, 10, (256,)))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
total = 4
batches = None

def train_one_step(*_):
    global batches
    batches = batches or iter(loader)
    x, y = next(batches)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()
""",
    "Distributed training / DCP": """
# One process is a world of size 1; DCP's own calls run as on a cluster.
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + os.path.abspath("pg-store"), rank=0, world_size=1)
""",
    "Serving: ModelCache and `weightbank serve`": """
# The reader's model class: the API tour's network (its config holds the training's lr, not the shape).
bank = tour_bank

class MyModel(torch.nn.Sequential):
    def __init__(self, **config):
        super().__init__(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))

x = torch.randn(4, 256, device="cuda" if torch.cuda.is_available() else "cpu")
""",
}

SKIPS: dict[str, str] = {
    'dist.init_process_group("nccl")': "needs NCCL and GPUs; tests/dist runs the same manager loop on gloo",
}

S3_SECTIONS = ("Object stores: S3 and friends", "Remote banks: local disk cache")
S3_PRELUDE = """
import torch
import weightbank as wb

model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))

def make_model(info):
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
"""
S3_PRELUDES = {
    S3_SECTIONS[0]: S3_PRELUDE,
    S3_SECTIONS[1]: 'bank.tag("prod", "candidate")  # the reader\'s bank has a prod tag, as in the tour\n',
}

# The README shows a GPU; without one the same block runs on the CPU (the device tier is then host memory).
CPU_REWRITES = {'device="cuda"': 'device="cpu"'}


@dataclass(frozen=True)
class Block:
    section: str
    line: int  # README line of the block's first code line (1-based)
    code: str
    prelude: str = ""
    checks: tuple[tuple[int, str], ...] = ()  # (line within the block, 1-based; expected literal source)


def python_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    section, start = "", 0
    fence: str | None = None  # the open fence's info string, None outside a fence
    body: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if fence is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            elif line.startswith("```"):
                fence, start, body = line[3:].strip(), n + 1, []
        elif line.startswith("```"):
            if fence == "python":
                blocks.append(Block(section, start, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    return blocks


def _literal(text: str, nargs: int) -> str | None:
    """The comment as a literal for ``nargs`` printed values, or None when it is prose."""
    candidates = [text, text.split(":", 1)[0]]  # "# True: every manifest..." checks True
    if nargs > 1:
        candidates = [", ".join(text.split())]
    for c in candidates:
        try:
            value = ast.literal_eval(c.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if nargs == 1 or (isinstance(value, tuple) and len(value) == nargs):
            return c.strip()
    return None


def expected_prints(code: str) -> tuple[tuple[int, str], ...]:
    """Top-level ``print(...)`` calls whose comment (same line, or alone on the next line) is a literal."""
    lines = code.splitlines()
    out: list[tuple[int, str]] = []
    for stmt in ast.parse(code).body:
        call = stmt.value if isinstance(stmt, ast.Expr) else None
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print"):
            continue
        if call.keywords or any(isinstance(a, ast.Starred) for a in call.args):
            continue
        end = stmt.end_lineno or stmt.lineno
        tail = lines[end - 1][stmt.end_col_offset or 0 :].strip()
        if tail.startswith("#"):
            comment = tail[1:]
        elif end < len(lines) and lines[end].strip().startswith("#"):
            comment = lines[end].strip()[1:]
        else:
            continue
        literal = _literal(comment, len(call.args))
        if literal is not None:
            out.append((stmt.lineno, literal))
    return tuple(out)


def session(blocks: list[Block], preludes: dict[str, str]) -> list[Block]:
    out: list[Block] = []
    seen: set[str] = set()
    for b in blocks:
        prelude = preludes.get(b.section, "") if b.section not in seen else ""
        seen.add(b.section)
        if any(key in b.code for key in SKIPS):
            continue
        out.append(Block(b.section, b.line, b.code, prelude, expected_prints(b.code)))
    return out


def run_session(spec_path: str) -> None:
    """Run in the subprocess: each block in one namespace, prints checked, tracebacks in README lines."""
    import socket
    import traceback

    spec = json.loads(Path(spec_path).read_text())
    _offline(socket)
    ns: dict[str, Any] = {"__name__": "__main__", "os": os}
    failures = 0
    for b in (Block(**{**d, "checks": tuple(map(tuple, d["checks"]))}) for d in spec["blocks"]):
        code = b.code
        for old, new in spec["rewrites"].items():
            code = code.replace(old, new)
        print(f"--- README.md:{b.line} ({b.section})", flush=True)
        try:
            if b.prelude:
                exec(compile(b.prelude, f"<prelude for {b.section}>", "exec"), ns)
            tree = _with_checks(ast.parse(code), dict(b.checks), b.line - 1)
            exec(compile(tree, "README.md", "exec"), ns)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        failures += ns.get("__readme_failures__", 0)
        ns["__readme_failures__"] = 0
    sys.exit(1 if failures else 0)


def _with_checks(tree: ast.Module, checks: dict[int, str], offset: int) -> ast.Module:
    """``print(a, b)  # x y`` becomes ``__readme_check__((a, b), (x, y), line)``: it prints, then compares."""
    helper = ast.parse(
        "def __readme_check__(values, expected, line):\n"
        "    got, want = ' '.join(map(str, values)), ' '.join(map(str, expected))\n"
        "    print(got)\n"
        "    if got != want:\n"
        "        print(f'README.md:{line}: printed {got!r}, the README says {want!r}', flush=True)\n"
        "        globals()['__readme_failures__'] = globals().get('__readme_failures__', 0) + 1\n"
    ).body
    body: list[ast.stmt] = []
    for stmt in tree.body:
        want = checks.get(stmt.lineno)
        if want is not None and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            nargs = len(stmt.value.args)
            expected = ast.parse(want if nargs == 1 else f"({want},)", mode="eval").body
            if nargs == 1:
                expected = ast.Tuple(elts=[expected], ctx=ast.Load())
            call = ast.Call(
                func=ast.Name("__readme_check__", ast.Load()),
                args=[
                    ast.Tuple(elts=stmt.value.args, ctx=ast.Load()),
                    expected,
                    ast.Constant(stmt.lineno + offset),
                ],
                keywords=[],
            )
            stmt = ast.copy_location(ast.Expr(call), stmt)
        body.append(stmt)
    tree.body = body
    ast.increment_lineno(tree, offset)  # tracebacks name README.md's own lines
    tree.body = [*helper, *body] if checks else body  # the helper keeps its own line 1..6
    return ast.fix_missing_locations(tree)


def _offline(socket: Any) -> None:
    """Refuse connections and name look-ups beyond this machine: the README's examples run offline."""
    local = {"localhost", "127.0.0.1", "::1", "0.0.0.0", ""}

    def is_local(host: Any) -> bool:
        return host is None or str(host) in local or str(host).startswith("127.")

    def check(address: Any) -> None:
        if isinstance(address, tuple) and not is_local(address[0]):
            raise OSError(f"the README test runs offline; refused a connection to {address!r}")

    real_connect, real_connect_ex, real_getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def connect(self: Any, address: Any) -> Any:
        check(address)
        return real_connect(self, address)

    def connect_ex(self: Any, address: Any) -> Any:
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_local(host):
            raise socket.gaierror(f"the README test runs offline; refused to look up {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo


def _run(blocks: list[Block], tmp_path: Path, config: pytest.Config, env: dict[str, str]) -> None:
    rewrites = {} if _has_cuda() else CPU_REWRITES
    spec = tmp_path / "readme-session.json"
    spec.write_text(json.dumps({"blocks": [asdict(b) for b in blocks], "rewrites": rewrites}))
    work = tmp_path / "work"
    work.mkdir()
    warnings = [f"-W{w}" for w in config.getini("filterwarnings")]
    cmd = [
        sys.executable,
        *warnings,
        "-c",
        f"from tests.test_readme import run_session; run_session({str(spec)!r})",
    ]
    full_env = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WEIGHTBANK_CACHE": str(tmp_path / "wbcache"),
    }
    full_env.pop("WEIGHTBANK_BANK", None)
    proc = subprocess.run(
        cmd, cwd=work, env=full_env, capture_output=True, text=True, timeout=540, check=False
    )
    if proc.returncode != 0:
        pytest.fail(
            f"a README block failed (rc={proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_readme_blocks_are_found() -> None:
    blocks = python_blocks(README.read_text())
    sections = {b.section for b in blocks}
    assert len(blocks) >= 10, "the README lost its examples, or the fence parser broke"
    for name in (*PRELUDES, *S3_SECTIONS):
        assert name in sections, f"no python block under a README heading {name!r}: rename the key here"
    for key in SKIPS:
        assert any(key in b.code for b in blocks), f"no README block contains {key!r}: drop it from SKIPS"
    assert any(b.checks for b in session(blocks, PRELUDES)), "no printed value is checked any more"
    for b in blocks:  # the blocks run on this machine: they must stay inside their temporary directory
        assert not re.search(r"""(open|export|import_file)\([^)]*["']/""", b.code), (
            f"absolute path in README.md:{b.line}"
        )


def test_expected_prints_are_read() -> None:
    code = "print(a)   # True: prose\nprint(b, c)  # 10240 273448\nprint(d)\n# [1, 2]\nprint(e)  # what it frees\n"
    assert expected_prints(code) == ((1, "True"), (2, "10240, 273448"), (3, "[1, 2]"))


def test_readme_python_blocks_run(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    blocks = [b for b in python_blocks(README.read_text()) if b.section not in S3_SECTIONS]
    _run(session(blocks, PRELUDES), tmp_path, pytestconfig, {})


@pytest.mark.s3
def test_readme_s3_blocks_run(tmp_path: Path, pytestconfig: pytest.Config, moto_s3: Any) -> None:
    text = README.read_text()
    endpoint = re.search(r'"endpoint_url": "(http://127\.0\.0\.1:\d+)"', text)
    assert endpoint is not None, "the S3 example lost its endpoint_url"
    blocks = [b for b in python_blocks(text) if b.section in S3_SECTIONS]
    buckets = set(re.findall(r"s3://([a-z0-9-]+)/", "".join(b.code for b in blocks)))
    for bucket in buckets:
        moto_s3.create_bucket(bucket)
    url = moto_s3.storage_options()["endpoint_url"]
    blocks = [
        Block(b.section, b.line, b.code.replace(endpoint.group(1), url), b.prelude, b.checks) for b in blocks
    ]
    _run(session(blocks, S3_PRELUDES), tmp_path, pytestconfig, {"AWS_ENDPOINT_URL": url})
