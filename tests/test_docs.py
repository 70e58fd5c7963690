"""The README and the code's docstrings point at what exists: the files they name, the README sections the code
cites, the config keys and the commands they tell a user to type. Each of these had drifted once (modules moved
under mgrpo/models/, a section renamed, `kl_reference=initial` for `algorithm.kl_reference=initial`, a `--report`
without the overrides its comparison was made with, which `mgrpo compare` refuses)."""
import argparse
import re
import shlex
from pathlib import Path

import pytest

from mgrpo.commands import COMMANDS
from mgrpo.config import TrainConfig, config_to_dict, load_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SOURCES = sorted([*ROOT.glob("mgrpo/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("bench/*.sh"),
                  *ROOT.glob("tests/*.py"), ROOT / "setup.py", README])
PATH = re.compile(r"(?:(?<=\./)|(?<![\w/.-]))((?:mgrpo|bench|tests|kernels|configs|examples)/[\w/.-]*\w\."
                  r"(?:py|sh|md|csv|json|jsonl|gz|png|yaml|txt))")
# Files a benchmark appends its rows to when it is run; the repository holds none yet.
WRITTEN_WHEN_RUN = {"bench/results/grouped_attention.csv", "bench/results/train_step.csv"}
ELSEWHERE = {"examples/offline_inference/torchrun_dp_example.py"}     # in vLLM's repository
FENCE = re.compile(r"^[ \t]*```([^\n]*)\n(.*?)^[ \t]*```", re.M | re.S)


def sources_but_this():
    return [source for source in SOURCES if source.name != "test_docs.py"]


def code_blocks(text: str) -> list:
    """(language, body) of every fenced block."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def test_every_file_the_docs_name_exists():
    missing, named = {}, set()
    for source in sources_but_this():
        paths = set(PATH.findall(source.read_text(encoding="utf-8")))
        named |= paths
        for path in paths - WRITTEN_WHEN_RUN - ELSEWHERE:
            if not (ROOT / path).exists() and not Path(path).name.startswith("no_such"):   # a test's bad input
                missing.setdefault(path, []).append(str(source.relative_to(ROOT)))
    assert len(named) > 50, f"the scan found only {len(named)} paths"
    assert not missing, f"named but not in the repository (path: where it is named): {missing}"


def test_files_written_when_run_are_written_by_their_benchmarks():
    """The exceptions above are outputs, named by the script that writes them."""
    for path in WRITTEN_WHEN_RUN:
        script = ROOT / "bench" / f"bench_{Path(path).stem}.py"
        assert path in script.read_text(), f"{path} is not written by {script.name}"


def readme_sections() -> list:
    """Headings and bold paragraph leads ('**The documented setting**'), which the README's prose cites too."""
    text = README.read_text(encoding="utf-8")
    headings = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    return headings + re.findall(r"\*\*([^*\n]+)\*\*", text)


def test_every_readme_section_the_code_cites_exists():
    sections = readme_sections()
    dangling, cited = {}, 0
    for source in sources_but_this():
        for title in re.findall(r'README,\s*\\?"([^"\\]*)\\?"', source.read_text(encoding="utf-8")):
            title, cited = " ".join(title.split()), cited + 1      # a docstring's line break inside the title
            if not title:
                dangling.setdefault("(split across string literals: keep README, \"Title\" on one line)",
                                    []).append(str(source.relative_to(ROOT)))
            elif not any(title in section for section in sections):
                dangling.setdefault(title, []).append(str(source.relative_to(ROOT)))
    assert cited > 10, f"the scan found only {cited} citations"
    assert not dangling, f"README sections cited but not in README.md (title: cited in): {dangling}"


SETTING = re.compile(r"(?<![\w./(-])(?<!, )([a-z_]+(?:\.\w+)*)=(?!=)")


def readme_key_settings(text: str) -> list:
    """The `key=value` settings of the README's inline code and of its code blocks but Python ones, keyword
    arguments of a call (`fully_shard(mesh=...)`) and version pins (`torch==2.13.0`) left out."""
    blocks = [body for language, body in code_blocks(text) if language not in ("python", "py", "pycon")]
    inline = re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    return [m.group(1) for span in blocks + inline for m in SETTING.finditer(span)]


def test_every_config_key_the_readme_names_exists():
    tree = config_to_dict(TrainConfig())
    top = {key for key, value in tree.items() if not isinstance(value, dict)}
    sections = {key: value for key, value in tree.items() if isinstance(value, dict)}
    unknown, unqualified, found = set(), set(), 0
    for key in readme_key_settings(README.read_text(encoding="utf-8")):
        first, *rest = key.split(".")
        if rest:                                    # a dotted key is a config key: its section and field must exist
            found += 1
            node = tree
            for part in key.split("."):
                if not (isinstance(node, dict) and part in node):
                    unknown.add(key)
                    break
                node = node[part]
        elif first not in top:
            owners = [name for name, fields in sections.items() if first in fields]
            if owners:                       # a section's field written without its section: load_config refuses it
                unqualified.add(f"{first} (write {' or '.join(f'{o}.{first}' for o in owners)})")
    assert found > 20, f"the scan found only {found} dotted settings"
    assert not unknown, f"README names config keys that do not exist: {sorted(unknown)}"
    assert not unqualified, f"README names section fields without their section: {sorted(unqualified)}"


def test_the_key_scan_sees_what_a_user_types():
    """The scan itself: a command line's settings are found; a call's keyword arguments, a Python block and a
    version pin are not."""
    found = readme_key_settings("run `mgrpo train algorithm.kl_reference=initial steps=3 kl_reference=x` and\n"
                                "```bash\nmgrpo compare optim.lr=1e-4 --out d\npip install torch==2.13.0\n```\n"
                                "```python\nmake(name=\"x\",\n     seed=1)\n```\n`fully_shard(m, mesh=x)`")
    assert found == ["optim.lr", "algorithm.kl_reference", "steps", "kl_reference"]


COMMAND = re.compile(rf"(?:^|[\s;&|$])mgrpo\s+({'|'.join(COMMANDS)})(?=\s|$)")


def readme_commands() -> list:
    """(line, argument list after `mgrpo`) of every `mgrpo <command>` line of the README's shell code blocks
    (continuation lines joined, comments cut; a line's output, `mgrpo train: error: ...`, is not a command)."""
    commands = []
    for language, body in code_blocks(README.read_text(encoding="utf-8")):
        if language in ("python", "py", "pycon"):
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = line.strip().removeprefix("$ ")
            if not COMMAND.search(line.split("#")[0]):
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError as e:
                raise AssertionError(f"README line {line!r}: {e}") from None
            start = next(i + 1 for i, word in enumerate(words[:-1]) if word == "mgrpo" and words[i + 1] in COMMANDS)
            rest = words[start:]              # up to the next command of the line (`... && mgrpo train && ...`)
            commands.append((line, rest[:next((i for i, w in enumerate(rest) if w in ("&&", "||", ";", "|")),
                                              len(rest))]))
    return commands


def test_the_readmes_commands_parse_and_their_settings_load(monkeypatch):
    """Every command the README shows is accepted by its parser, its train settings by load_config, and the
    commands that share a comparison's --out carry its preset and overrides (a comparison continues only with
    them: the README once showed a --report that was refused)."""
    monkeypatch.chdir(ROOT)                   # the README's paths (configs/...) are the repository's
    parsers = {}
    for name, command in COMMANDS.items():
        parsers[name] = argparse.ArgumentParser(prog=f"mgrpo {name}", exit_on_error=False)
        command.add_arguments(parsers[name])
    commands, settings_by_out = readme_commands(), {}
    assert len(commands) >= 15, f"the scan found only {len(commands)} commands"
    for line, words in commands:
        if "--help" in words or "-h" in words:
            continue
        try:
            args = parsers[words[0]].parse_args(words[1:])
            if words[0] in ("train", "compare"):
                load_config(getattr(args, "config", None), [o for o in args.overrides if "$" not in o])
        except (argparse.ArgumentError, SystemExit, ValueError) as e:
            pytest.fail(f"README command {line!r}: {e}")
        if words[0] == "compare" and args.out:
            settings_by_out.setdefault(args.out, set()).add((args.preset, tuple(args.overrides)))
    differing = {out: settings for out, settings in settings_by_out.items() if len(settings) > 1}
    assert not differing, f"commands on one --out with different presets or overrides: {differing}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but - and _ dropped, each space a -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_within_the_readme_reaches_a_heading():
    text = README.read_text(encoding="utf-8")
    anchors = {github_anchor(line.lstrip("#")) for line in FENCE.sub("", text).splitlines() if line.startswith("#")}
    links = re.findall(r"\]\(#([^)\s]+)\)", text)
    assert len(links) >= 10, f"the scan found only {len(links)} links"
    assert not set(links) - anchors, f"README links to no heading: {sorted(set(links) - anchors)}"
    assert github_anchor("Collapse: where (`mgrpo compare --preset collapse`)") == \
        "collapse-where-mgrpo-compare---preset-collapse"
