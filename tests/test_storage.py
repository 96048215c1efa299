"""Storage seam: local and S3 (a real SeaweedFS) behave alike; errors are clear and hold no secret."""

import os

import pytest

from raygpt.errors import RaygptError
from raygpt.storage import Storage, join

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return f"s3://raygpt-test/storage-{os.urandom(4).hex()}"


def test_write_read_list_delete(root):
    st = Storage()
    st.write_json(join(root, "a", "x.json"), {"k": 1})
    st.write_bytes(join(root, "a", "y.bin"), b"\x00\x01")
    assert st.read_json(join(root, "a", "x.json")) == {"k": 1}
    assert st.list(join(root, "a")) == ["x.json", "y.bin"]  # no temporary names left behind
    assert st.exists(join(root, "a", "y.bin"))
    st.delete(join(root, "a"))
    assert st.list(join(root, "a")) == [] and not st.exists(join(root, "a", "x.json"))


def test_upload_download_folder(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("hi")
    st = Storage()
    st.upload(src, join(root, "tree"))
    st.download(join(root, "tree"), tmp_path / "dst")
    assert (tmp_path / "dst" / "sub" / "f.txt").read_text() == "hi"


def test_missing_bucket_wrong_credentials_unreachable_endpoint(s3_env, monkeypatch):
    with pytest.raises(RaygptError, match="bucket 'no-such-bucket' does not exist"):
        Storage().check_access("s3://no-such-bucket/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-123")
    with pytest.raises(RaygptError, match="access denied") as err:
        Storage().read_bytes("s3://raygpt-test/anything")
    assert "not-the-secret-123" not in str(err.value)
    assert s3_env.secret_key not in str(err.value)
    with pytest.raises(RaygptError, match="cannot be reached"):
        Storage(endpoint_url="http://127.0.0.1:9").check_access("s3://raygpt-test/x")
