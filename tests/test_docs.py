"""The docs' runnable examples run as they stand."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_example_runs():
    text = open(os.path.join(ROOT, "docs/api.md")).read()
    blocks = re.findall(r"```python example\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    res = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "restored" in res.stdout and "went on from" in res.stdout


def test_readme_commands_exist():
    text = open(os.path.join(ROOT, "README.md")).read()
    cmds = re.findall(r"^(tools/\w+)", text, re.M)
    assert cmds[:2] == ["tools/demo", "tools/test"]
    for c in cmds[:2]:
        assert os.access(os.path.join(ROOT, c), os.X_OK)
    ci = open(os.path.join(ROOT, ".ci/run")).read()
    assert "tools/test" in ci


def _doc_commands() -> list[tuple[str, list[str]]]:
    """Every `checkpoint ...` command line in a code block of README.md and
    docs/*.md, continuation lines joined, comments dropped."""
    import glob
    import shlex
    out = []
    for path in ["README.md", *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        text = open(os.path.join(ROOT, path)).read()
        for block in re.findall(r"```(?:sh|bash|)\n(.*?)```", text, re.S):
            block = block.replace("\\\n", " ")
            for line in block.splitlines():
                line = line.split(" #", 1)[0].strip()
                line = re.sub(r"^\$ ", "", line)
                m = re.match(r"^(?:\.venv/bin/)?checkpoint (.*)", line)
                if m:
                    out.append((os.path.basename(path), shlex.split(m.group(1))))
        # the synopses in headings: ## `checkpoint VERB ...`
        for syn in re.findall(r"^#+ .*?`checkpoint ([^`]+)`", text, re.M):
            out.append((os.path.basename(path), shlex.split(syn.replace("[options]", ""))))
    return out


# what a placeholder in the docs stands for, when parsed
_PLACEHOLDERS = {"PID": "1", "N": "1", "MS": "50", "FD": "1", "S": "5", "RATE": "1G",
                 "HOST:PORT": "127.0.0.1:1", "fd[N]:KEY": "fd[0]:pipe:[1]"}


def test_every_command_in_the_docs_parses():
    """Each command the docs show is accepted by the real parser: every verb
    and option it names exists and takes the value shown (options in
    [brackets] are checked one by one)."""
    from checkpoint.cli import build_parser
    cmds = _doc_commands()
    assert len(cmds) >= 10, cmds
    parser = build_parser()
    for where, argv in cmds:
        optional = []
        plain = []
        for tok in argv:
            if tok.startswith("[") or optional and not optional[-1][-1].endswith("]"):
                optional.append([]) if tok.startswith("[") else None
                optional[-1].append(tok)
            else:
                plain.append(tok)
        args = [_PLACEHOLDERS.get(t, t) for t in plain]
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"{where}: checkpoint {' '.join(argv)}: rejected") from exc
        for opt in optional:
            words = " ".join(opt).strip("[]").split(" | ")[0].split()
            words = [_PLACEHOLDERS.get(w, w) for w in words if w not in ("...", "|")]
            words = [w.strip("{}").split(",")[0] if w.startswith("{") else w for w in words]
            try:
                parser.parse_args(args + words)
            except SystemExit as exc:
                raise AssertionError(f"{where}: option {' '.join(opt)} of "
                                     f"checkpoint {argv[0]} rejected") from exc


def test_readme_quick_start_runs(tmp_path):
    """The README's quick start, on a real process: pre-dump, dump, restore -d, show."""
    import json
    cli = [os.path.join(os.path.dirname(sys.executable), "checkpoint")]
    p = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    imgs = str(tmp_path / "imgs")
    try:
        for verb in (["check"], ["pre-dump", "-t", str(p.pid), "-D", imgs],
                     ["dump", "-t", str(p.pid), "-D", imgs]):
            r = subprocess.run(cli + verb, capture_output=True, text=True)
            assert r.returncode == 0, (verb, r.stderr)
        p.wait(10)
        r = subprocess.run(cli + ["restore", "-D", imgs, "-d", "--json"], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        pid = json.loads(r.stdout)["pid"]
        assert pid == p.pid
        os.kill(pid, 9)
        r = subprocess.run(cli + ["show", "-D", imgs], capture_output=True, text=True)
        assert r.returncode == 0 and "restorable" in r.stdout, r.stdout
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
