"""secure_ai.quiet: hides prints, displays, warnings and logs; SECURE_AI_VERBOSE turns it off."""
import logging
import warnings

import pytest
from secure_ai import quiet as quiet_module


def test_quiet_swallows_prints_warnings_and_logs(capsys, caplog):
    with quiet_module.quiet():
        print("banner")
        warnings.warn("noise", UserWarning, stacklevel=1)
        logging.getLogger("syft.server").critical("CRITICAL:syft.server.server:Hash of the signing key")
    captured = capsys.readouterr()
    assert "banner" not in captured.out + captured.err
    assert "Hash of the signing key" not in caplog.text
    print("after")
    assert "after" in capsys.readouterr().out


def test_quiet_lets_exceptions_through():
    with pytest.raises(KeyError), quiet_module.quiet():
        raise KeyError("still visible")
    assert logging.root.manager.disable == 0  # logging restored


def test_verbose_mode_shows_everything(monkeypatch, capsys):
    monkeypatch.setenv("SECURE_AI_VERBOSE", "1")
    assert quiet_module.verbose()
    with quiet_module.quiet():
        print("debug me")
    assert "debug me" in capsys.readouterr().out
