"""The storage seam's retry policy and Ray Train's retrying filesystem: unit tests, no store."""

from __future__ import annotations

import pickle

import pyarrow.fs as pafs
import pytest

from raygpt.errors import RaygptError
from raygpt.storage import Storage, _explained
from raygpt.storage.resilient import RetryingHandler, retrying_filesystem
from raygpt.storage.retry import RetryPolicy, StoreUnavailableError, is_transient

UNREACHABLE = OSError("When getting information for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                      "HeadObject operation: curlCode: 7, Could not connect to server")
DENIED = OSError("When reading information for key 'x' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject "
                 "operation: No response body.")


class FakeTime:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def failing(times: int, error: OSError):
    calls = []

    def action():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return action, calls


def test_transient_and_permanent_errors_are_told_apart():
    assert is_transient(UNREACHABLE)
    assert is_transient(OSError("AWS Error SERVICE_UNAVAILABLE during PutObject operation: 503"))
    assert is_transient(OSError("curlCode: 28, Timeout was reached"))
    assert not is_transient(DENIED)
    assert not is_transient(OSError("AWS Error NO_SUCH_BUCKET ... NoSuchBucket"))
    assert not is_transient(FileNotFoundError("Path does not exist 'b/x'"))
    assert not is_transient(ValueError("could not connect"))  # not an I/O error at all


def test_transient_errors_are_retried_with_exponential_backoff():
    t = FakeTime()
    action, calls = failing(5, UNREACHABLE)
    policy = RetryPolicy(budget_s=600, first_delay_s=0.5, max_delay_s=4)
    assert policy.call(action, "write s3://b/x", sleep=t.sleep, clock=t.clock) == "done"
    assert len(calls) == 6 and t.sleeps == [0.5, 1, 2, 4, 4]


def test_a_permanent_error_fails_at_once():
    t = FakeTime()
    action, calls = failing(1, DENIED)
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        RetryPolicy(budget_s=600).call(action, "write s3://b/x", sleep=t.sleep, clock=t.clock)
    assert len(calls) == 1 and t.sleeps == []


def test_an_outage_longer_than_the_budget_ends_in_one_clear_message():
    t = FakeTime()
    action, calls = failing(10_000, UNREACHABLE)
    with pytest.raises(StoreUnavailableError) as error:
        RetryPolicy(budget_s=60, max_delay_s=15).call(action, "write s3://b/x", sleep=t.sleep, clock=t.clock)
    assert t.now <= 60
    message = str(error.value)
    assert message.startswith("write s3://b/x: the S3 endpoint did not answer for ")
    assert "storage.retry_minutes: 1" in message and "could not connect to server" in message
    # Ray Train retries an upload whose error names these tokens: that would spend the budget again.
    assert "AWS Error" not in message and "NETWORK_CONNECTION" not in message
    assert not is_transient(error.value)  # an outer policy does not start over
    assert str(pickle.loads(pickle.dumps(error.value))) == message  # it crosses from a Ray worker
    # The storage seam names the URI and the budget in its RaygptError.
    with pytest.raises(RaygptError, match=r"s3://b/x: cannot write: the S3 endpoint did not answer for \d+ s"):
        with _explained("s3://b/x", "write"):
            raise error.value


def test_no_budget_means_no_retry():
    action, calls = failing(1, UNREACHABLE)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        RetryPolicy(budget_s=0).call(action, "read s3://b/x", sleep=FakeTime().sleep)
    assert len(calls) == 1


class FlakyLocal(pafs.FileSystemHandler):
    """A local filesystem whose every operation fails ``failures`` times first (a store outage)."""

    def __init__(self, failures: int):
        self.fs, self.failures = pafs.LocalFileSystem(), failures

    def _maybe_fail(self):
        if self.failures > 0:
            self.failures -= 1
            raise UNREACHABLE

    def __eq__(self, other):
        return isinstance(other, FlakyLocal)

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return "flaky"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        self._maybe_fail()
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        self._maybe_fail()
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self._maybe_fail()
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)
        self._maybe_fail()  # deleted, but the answer was lost

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("no")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        self._maybe_fail()
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata=None):
        self._maybe_fail()
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path, metadata=None):
        raise OSError("no")


def test_the_retrying_filesystem_rides_out_failures_and_writes_objects_whole(tmp_path, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    inner = pafs.PyFileSystem(FlakyLocal(failures=2))
    fs = retrying_filesystem(inner, RetryPolicy(budget_s=60))
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.pt").write_bytes(b"m" * 100_000)
    (src / "trainer_state.json").write_text("{}")
    dest = str(tmp_path / "store" / "checkpoint_00000004")
    fs.create_dir(dest, recursive=True)  # fails twice, then succeeds
    inner.handler.failures = 1
    pafs.copy_files(str(src), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    assert (tmp_path / "store" / "checkpoint_00000004" / "model.pt").read_bytes() == b"m" * 100_000
    inner.handler.failures = 2
    with fs.open_input_stream(f"{dest}/model.pt") as f:
        assert f.read() == b"m" * 100_000
    inner.handler.failures = 1
    fs.delete_dir(dest)  # the first answer is lost; the retry finds nothing left: done
    assert not (tmp_path / "store" / "checkpoint_00000004").exists()


def test_the_retrying_filesystem_pickles_and_equals_its_copies():
    storage = Storage(endpoint_url="http://127.0.0.1:9", retry_minutes=10)
    _, fs = storage.ray_storage("s3://bucket/runs")
    copy = pickle.loads(pickle.dumps(fs))
    assert isinstance(copy.handler, RetryingHandler) and copy.handler.policy.budget_s == 600
    assert copy == fs  # Ray Train's is_managed_checkpoint compares them
    assert fs != retrying_filesystem(storage.s3_filesystem(background_writes=False), RetryPolicy(budget_s=5))
    assert storage.ray_storage("/tmp/runs")[1] is None
