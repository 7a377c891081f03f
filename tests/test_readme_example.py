"""The README's alignment-op example runs as written."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_alignment_op_example_runs(capsys):
    text = README.read_text()
    match = re.search(r"<!-- example: alignment-op -->\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its alignment-op example"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 18
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert re.fullmatch(r"proj_loss -?\d\.\d{4}\n", capsys.readouterr().out)
    loss, projector = namespace["loss"], namespace["projector"]
    assert torch.isfinite(loss) and loss.dim() == 0
    assert all(p.grad is not None for p in projector.parameters())
