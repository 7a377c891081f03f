"""``--help`` of the command-line tools: every training flag explained (what, default, choices,
group), the README's flag table generated from the same source, and the other tools' flags."""
import contextlib
import io
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from repa_fast.training.config import (GROUPS, REGENERATE, TrainConfig, flags_markdown,
                                       parse_args, readme_table)

ROOT = Path(__file__).resolve().parents[1]

# the flags of the official REPA train.py (sihyun-yu/REPA), as repa_fast spells them
OFFICIAL = {"--output-dir", "--exp-name", "--report-to", "--sampling-steps", "--model",
            "--num-classes", "--encoder-depth", "--fused-attn", "--qk-norm", "--data-dir",
            "--resolution", "--batch-size", "--allow-tf32", "--mixed-precision",
            "--max-train-steps", "--checkpointing-steps", "--learning-rate", "--adam-beta1",
            "--adam-beta2", "--adam-weight-decay", "--adam-epsilon", "--max-grad-norm", "--seed",
            "--num-workers", "--path-type", "--prediction", "--cfg-prob", "--enc-type",
            "--proj-coeff", "--weighting", "--gradient-accumulation-steps"}


def help_output(entry, argv=("--help",)) -> str:
    """What ``entry(argv)`` prints before argparse exits, on a terminal wide enough that no
    help text wraps."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "3000")
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            entry(list(argv))
    assert exit_info.value.code == 0
    return out.getvalue()


def help_sections(text: str) -> dict:
    """argparse --help output -> {group title: {first flag: help text}}, in order."""
    sections, options, current = {}, None, None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            options = sections.setdefault(line[:-1], {}) if line.endswith(":") else None
            current = None
            continue
        option = re.match(r"  (--[\w-]+)\S*((?: \S+)*)(?:\s{2,}(.*))?$", line)
        if options is not None and option:
            current = option.group(1)
            options[current] = option.group(3) or ""
        elif current and line.startswith(" " * 8):  # a help text continued on its own line
            options[current] = (options[current] + " " + line.strip()).strip()
        else:
            current = None  # a group description
    return sections


@pytest.fixture(scope="module")
def train_sections():
    return help_sections(help_output(parse_args))


def expected_default(field) -> str:
    if field.default is None:  # must be explained: what does "unset" do?
        shown = field.metadata.get("shown")
        assert shown and shown != "None", f"--{field.name}: None default without an explanation"
        return shown
    if field.type in ("bool", "Optional[bool]"):
        return "on" if field.default else "off"
    return str(field.default)


def test_every_field_has_help_default_and_group(train_sections):
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        title = GROUPS[field.metadata["group"]]
        assert flag in train_sections.get(title, {}), f"{flag} is not in the '{title}' group"
        text = train_sections[title][flag]
        what, _, default = text.rpartition(" (default: ")
        assert len(what.strip()) > 10, f"{flag}: no help text ({text!r})"
        assert default == expected_default(field) + ")", f"{flag}: default shown as {text!r}"
    shown = {flag for options in train_sections.values() for flag in options}
    assert shown == {"--" + f.name.replace("_", "-") for f in fields(TrainConfig)}


def test_groups_in_order_with_the_official_flags_first(train_sections):
    titles = [t for t in train_sections if t in GROUPS.values()]
    assert titles == list(GROUPS.values())
    for title in titles:
        flags = list(train_sections[title])
        official = [f in OFFICIAL for f in flags]
        assert official == sorted(official, reverse=True), f"'{title}': {flags}"
    assert train_sections["model"]["--model"] and "--batch-size" in train_sections["optimisation"]
    assert "--enc-type" in train_sections["REPA"] and "--data-dir" in train_sections["data"]
    assert "--ds-config" in train_sections["DeepSpeed"]
    assert "--checkpointing-steps" in train_sections["checkpoints and logging"]
    for field in fields(TrainConfig):  # what the README marks in bold
        assert field.metadata["official"] == ("--" + field.name.replace("_", "-") in OFFICIAL)


def test_help_lists_the_choices_the_code_accepts(train_sections):
    from repa_fast.ops.attention import CHOICES
    from repa_fast.data.loaders import BACKENDS, ON_BAD_SAMPLE
    from repa_fast.encoders import ENCODER_NAMES
    from repa_fast.models import SiT_models
    from repa_fast.training.config import MIXED_PRECISION
    from repa_fast.training.metrics import REPORTERS
    from repa_fast.training.optim import OPTIMIZERS
    from repa_fast.transport import PATH_TYPES, WEIGHTINGS
    options = {flag: text for section in train_sections.values() for flag, text in section.items()}
    for flag, choices in [("--model", SiT_models), ("--mixed-precision", MIXED_PRECISION),
                          ("--report-to", REPORTERS), ("--optimizer", OPTIMIZERS),
                          ("--data-backend", BACKENDS), ("--on-bad-sample", ON_BAD_SAMPLE),
                          ("--attn-backend", CHOICES), ("--enc-type", ENCODER_NAMES),
                          ("--path-type", PATH_TYPES), ("--weighting", WEIGHTINGS),
                          ("--preset", ["demo"])]:
        listed = re.search(r"choices: ([^(]*?) \(default", options[flag]).group(1).split(", ")
        assert set(choices) <= set(listed), f"{flag}: {listed} lacks some of {list(choices)}"


@pytest.mark.parametrize("argv, message", [
    (["--model", "SiT-Q/2"], "--model must be one of SiT-XL/1, "),
    (["--mixed-precision", "fp8"], "--mixed-precision must be one of no, fp16, bf16; got 'fp8'"),
    (["--report-to", "mlflow"], "--report-to must be one of tensorboard, wandb, none"),
    (["--path-type", "sine"], "--path-type must be one of linear, cosine; got 'sine'"),
    (["--data-backend", "ffcv"], "--data-backend must be one of auto, dali, torch"),
    (["--enc-type", "dinov2-vit-b,dino-vit-x"], "--enc-type must be one or more"),
    (["--num-workers", "-1"], "--num-workers must be >= 0; got -1"),
])
def test_invalid_values_get_the_package_messages(argv, message):
    config = parse_args(argv)  # argparse takes any value: the check names the flag
    with pytest.raises(ValueError, match=re.escape(message)):
        config.check()


def test_official_spellings_are_accepted():
    config = parse_args(["--output_dir", "out", "--exp_name", "run", "--ds_config", "z.json"])
    assert (config.output_dir, config.exp_name, config.ds_config) == ("out", "run", "z.json")


def test_readme_flag_table_is_generated_from_the_config():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme_table(readme) == flags_markdown(), (
        f"README.md's training flag table differs from TrainConfig: run `{REGENERATE}`")
    training = readme.split("\n## Training\n", 1)[1].split("\n## ", 1)[0]
    assert "<!-- train-flags:begin -->" in training


def test_train_help_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "repa_fast.train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoints and logging:" in proc.stdout and "--proj-coeff X" in proc.stdout


# Flags of the other tools whose help does not give a default yet (owner: data/prepare.py).
# New flags must not join them.
KNOWN_WITHOUT_DEFAULT = {
    "generate": set(),
    "evaluate": set(),
    "analyze": set(),
    "compare": set(),
    "data.prepare": set(),
}


def _parse(module: str):
    if module == "data.prepare":
        from repa_fast.data.prepare import parse_args as parse
        return parse
    entry = __import__(f"repa_fast.{module}", fromlist=["build_parser"])
    return entry.build_parser().parse_args


@pytest.mark.parametrize("module", sorted(KNOWN_WITHOUT_DEFAULT))
def test_other_tools_explain_their_flags(module):
    text = help_output(_parse(module))
    usage = " ".join(text.split("\n\n", 1)[0].split())
    required = set(re.findall(r"(?:^|\s)(--[\w-]+)", re.sub(r"\[[^\]]*\]", "", usage)))
    options = {flag: help for section in help_sections(text).values()
               for flag, help in section.items() if flag != "--help"}
    lacking = {flag for flag, help in options.items()
               if flag not in required and "default" not in help.lower()}
    assert lacking <= KNOWN_WITHOUT_DEFAULT[module], \
        f"python -m repa_fast.{module}: no help or default for {sorted(lacking)}"
