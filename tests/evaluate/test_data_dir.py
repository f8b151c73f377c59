import pytest

from fucina.errors import DataError
from fucina.evaluate.heldout import DATA_DIR_ENV, resolve_data_dir


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A working directory `tmp/work` with `tmp/shared/data` beside it, and no environment override."""
    work, shared = tmp_path / "work", tmp_path / "shared" / "data"
    work.mkdir()
    shared.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    return shared


def test_the_explicit_data_dir_wins_over_the_environment_and_the_default(checkout, tmp_path, monkeypatch):
    explicit, environment = tmp_path / "explicit", tmp_path / "environment"
    explicit.mkdir()
    environment.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(environment))
    assert resolve_data_dir(explicit) == explicit
    assert resolve_data_dir() == environment


def test_without_options_the_data_is_shared_data_beside_the_working_directory(checkout):
    assert resolve_data_dir().resolve() == checkout.resolve()


def test_a_missing_data_dir_names_all_three_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError) as error:
        resolve_data_dir()
    message = str(error.value)
    assert "--data-dir" in message and f"${DATA_DIR_ENV}" in message and "../shared/data" in message
