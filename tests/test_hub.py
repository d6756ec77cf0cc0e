"""--push-to-hub: checked before anything is trained; the saved folder (with its card) is uploaded."""

import huggingface_hub
import pytest

from pudm.cli import main

TINY = ["--steps", "2", "--batch-size", "8", "--sample-steps", "2", "--grid-size", "4", "--quiet"]


@pytest.mark.parametrize(
    "repo, env, expected",
    [
        ("me/model", {"HF_HUB_OFFLINE": "1"}, "the Hub is off here (HF_HUB_OFFLINE)"),
        ("me/model", {"HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}, "cannot use the Hub"),
        ("model", {}, "a repository id of the form NAME/MODEL"),
    ],
)
def test_an_unusable_hub_fails_in_one_line_before_training(
    tmp_path, capsys, monkeypatch, repo, env, expected
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def refuse(self, *args, **kwargs):
        raise huggingface_hub.errors.LocalTokenNotFoundError("no token")

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", refuse)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--push-to-hub", repo]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_the_finished_run_uploads_its_pipeline_with_its_card(tmp_path, monkeypatch):
    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, *a, **k: {"name": "me"})
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **k: calls.append(("create", repo_id))
    )

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload", repo_id, sorted(p.name for p in folder_path.iterdir())))

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--push-to-hub", "me/model"]) == 0
    assert calls[0] == ("create", "me/model")
    assert calls[1][:2] == ("upload", "me/model") and {"README.md", "model_index.json", "unet"} <= set(
        calls[1][2]
    )
