"""The command-line error policy: one line, exit 2 for usage, 1 for the machine, bugs raise."""
import errno

import pytest

from repa_fast.errors import USAGE_AND_VALUE, UsageError, exit_code, message, run_cli


def raising(error):
    def body():
        raise error
    return body


def test_usage_errors_exit_2_with_their_message(capsys):
    assert run_cli(raising(UsageError("--ckpt x.pt: not a checkpoint"))) == 2
    assert capsys.readouterr().err == "error: --ckpt x.pt: not a checkpoint\n"
    # plain ValueErrors are usage errors only where the command says so (train, prepare)
    with pytest.raises(ValueError):
        run_cli(raising(ValueError("a bug")))
    assert run_cli(raising(ValueError("--batch-size 0")), usage=USAGE_AND_VALUE) == 2


def test_os_errors_exit_1_naming_the_path_and_cause(capsys):
    error = OSError(errno.ENOSPC, "No space left on device", "/ckpt/0000001.pt")
    assert run_cli(raising(error)) == 1
    assert capsys.readouterr().err == "error: /ckpt/0000001.pt: No space left on device\n"


def test_the_os_error_behind_a_runtime_error_is_reported():
    # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/out/x.npz")
        except OSError as cause:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") \
                from cause
    except RuntimeError as error:
        assert exit_code(error) == 1
        assert message(error) == "/out/x.npz: No space left on device"


def test_bugs_keep_their_traceback():
    with pytest.raises(KeyError):
        run_cli(raising(KeyError("x")))


def test_debug_prints_the_traceback_too(capsys, monkeypatch):
    monkeypatch.setenv("REPA_FAST_DEBUG", "1")
    assert run_cli(raising(UsageError("bad flag"))) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: bad flag\n")


def test_a_bug_while_handling_an_os_error_keeps_its_traceback():
    def body():
        try:
            raise PermissionError(13, "Permission denied", "/proc/1/mem")
        except OSError:
            undefined_name  # noqa: F821 -- the bug
    with pytest.raises(NameError):
        run_cli(body)
