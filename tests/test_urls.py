"""`response_format=url`: capability URLs that plain clients fetch, on local disk or an S3-compatible bucket."""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient

from sd35.storage import LocalImageStore, S3ImageStore, StoreFullError
from tests.conftest import assert_openai_error, service_client
from tests.server import failed_start, moto_s3, running_server

GEN = "/v1/images/generations"
KEY = "k-url"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"num_inference_steps": 1}
URL_RE = re.compile(r"^http://testserver/v1/images/files/([A-Za-z0-9_-]{32})\.(png|jpeg|webp)$")


def fetch_image(client: TestClient | httpx.Client, url: str) -> tuple[Image.Image, httpx.Response]:
    response = client.get(url)  # no Authorization header: the URL is the credential
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image, response


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "images"


@pytest.fixture
def secured(tiny_model_dir: Path, store_dir: Path) -> Iterator[TestClient]:
    env = {"MODEL_ID": str(tiny_model_dir), "API_KEY": KEY, "IMAGE_STORE_DIR": str(store_dir), "WARMUP": "false"}
    with service_client(env) as client:
        yield client


@pytest.mark.parametrize(
    ("output_format", "pil", "mime"), [("png", "PNG", "image/png"), ("webp", "WEBP", "image/webp")]
)
def test_url_images_are_fetchable_without_the_key(
    secured: TestClient, output_format: str, pil: str, mime: str, store_dir: Path
) -> None:
    body = {"prompt": "a fox", "size": "512x256", "n": 2, "response_format": "url", "output_format": output_format}
    response = secured.post(GEN, json={**body, **FAST}, headers=AUTH)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 2 and all(set(item) == {"url"} for item in data)
    names = set()
    for item in data:
        match = URL_RE.match(item["url"])
        assert match and match.group(2) == output_format, item["url"]
        names.add(match.group(1))
        image, fetched = fetch_image(secured, item["url"])
        assert (image.format, image.size) == (pil, (512, 256))
        assert fetched.headers["content-type"] == mime
        assert fetched.headers["x-content-type-options"] == "nosniff"
        assert 3500 <= int(fetched.headers["cache-control"].split("max-age=")[1]) <= 3600
    assert len(names) == 2
    assert sorted(path.name.split(".")[0] for path in store_dir.iterdir()) == sorted(names)


def test_jpeg_url_extension(secured: TestClient) -> None:
    body = {"prompt": "a fox", "size": "256x256", "response_format": "url", "output_format": "jpeg", **FAST}
    url = secured.post(GEN, json=body, headers=AUTH).json()["data"][0]["url"]
    assert url.endswith(".jpeg")
    image, fetched = fetch_image(secured, url)
    assert image.format == "JPEG" and fetched.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize(
    ("headers", "prefix"),
    [
        ({"X-Forwarded-Proto": "https", "X-Forwarded-Host": "img.example.com"}, "https://img.example.com/"),
        (
            {"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "a.example.com:8443, b"},
            "https://a.example.com:8443/",
        ),
        ({"Forwarded": 'for=1.2.3.4;proto=https;host="fw.example.com"'}, "https://fw.example.com/"),
        ({"X-Forwarded-Host": "edge.example.com", "X-Forwarded-Prefix": "/sd35"}, "http://edge.example.com/sd35/"),
        ({"X-Forwarded-Host": "evil.example.com/phish?x=", "X-Forwarded-Proto": "javascript"}, "http://testserver/"),
        ({"X-Forwarded-Host": "ok.example.com", "X-Forwarded-Prefix": "/../x?"}, "http://ok.example.com/"),
    ],
)
def test_the_url_follows_the_proxy(secured: TestClient, headers: dict[str, str], prefix: str) -> None:
    body = {"prompt": "a fox", "size": "256x256", "response_format": "url", **FAST}
    url = secured.post(GEN, json=body, headers={**AUTH, **headers}).json()["data"][0]["url"]
    assert url.startswith(prefix + "v1/images/files/"), url


def test_public_base_url_wins(tiny_model_dir: Path, store_dir: Path) -> None:
    env = {
        "MODEL_ID": str(tiny_model_dir),
        "IMAGE_STORE_DIR": str(store_dir),
        "PUBLIC_BASE_URL": "https://images.example.com/api/",
        "WARMUP": "false",
    }
    with service_client(env) as client:
        body = {"prompt": "a fox", "size": "256x256", "response_format": "url", **FAST}
        url = client.post(GEN, json=body, headers={"X-Forwarded-Host": "other.example.com"}).json()["data"][0]["url"]
        assert url.startswith("https://images.example.com/api/v1/images/files/")
        fetch_image(client, url.replace("https://images.example.com/api", ""))


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images/files/doesnotexistdoesnotexistdoesnotex.png",
        "/v1/images/files/short.png",
        "/v1/images/files/..%2F..%2Fetc%2Fpasswd",
        "/v1/images/files/%2e%2e/%2e%2e/service.py",
        "/v1/images/files/../../service.py",
        "/v1/images/files/a%2Fb.png",
        "/v1/images/files/",
        "/v1/images/files",
        "/v1/images/files/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.gif",
        "/v1/images/files/.tmp-abc",
        "/v1/images/files/a%0Ab.png",
    ],
)
def test_path_tricks_and_unknown_ids_are_404(secured: TestClient, path: str) -> None:
    for headers in ({}, AUTH):
        response = secured.get(path, headers=headers)
        # No route at all ("Invalid URL", code null, before any key is asked), or the route and no such image.
        assert_openai_error(response, 404, None if "Invalid URL" in response.text else "not_found")


def test_the_route_is_read_only(secured: TestClient) -> None:
    url = secured.post(GEN, json={"prompt": "a", "size": "256x256", "response_format": "url", **FAST}, headers=AUTH)
    path = url.json()["data"][0]["url"].replace("http://testserver", "")
    for method in ("POST", "PUT", "DELETE"):
        assert_openai_error(secured.request(method, path), 405, "method_not_allowed")
    assert secured.get(path).status_code == 200


def test_expired_images_are_404_and_deleted(tiny_model_dir: Path, store_dir: Path) -> None:
    env = {"MODEL_ID": str(tiny_model_dir), "IMAGE_STORE_DIR": str(store_dir), "IMAGE_TTL_SECONDS": "1"}
    with service_client({**env, "WARMUP": "false"}) as client:
        body = {"prompt": "a", "size": "256x256", "response_format": "url", **FAST}
        url = client.post(GEN, json=body).json()["data"][0]["url"]
        fetch_image(client, url)
        time.sleep(1.2)
        assert_openai_error(client.get(url), 404, "not_found")
        assert list(store_dir.iterdir()) == []


def test_images_survive_a_restart(tiny_model_dir: Path, store_dir: Path) -> None:
    env = {"MODEL_ID": str(tiny_model_dir), "IMAGE_STORE_DIR": str(store_dir), "WARMUP": "false"}
    with service_client(env) as client:
        body = {"prompt": "a", "size": "256x256", "response_format": "url", **FAST}
        url = client.post(GEN, json=body).json()["data"][0]["url"]
    with service_client(env) as restarted:
        fetch_image(restarted, url)


def test_a_full_store_refuses_new_images_instead_of_evicting_others(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path, ttl_seconds=3600, max_bytes=1 << 20)
    kept = [store.put(bytes([i]) * 400_000, "png", "http://h").rsplit("/", 1)[1] for i in range(2)]
    assert store.has_room()
    with pytest.raises(StoreFullError, match="IMAGE_STORE_MAX_BYTES"):
        store.put(b"x" * 400_000, "png", "http://h")
    assert all(store.get(name) is not None for name in kept), "nobody's image is pushed out before its expiry"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(kept), "nothing left of the refused one"


def test_expired_images_make_room(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path, ttl_seconds=0.3, max_bytes=1 << 20)
    old = store.put(b"o" * 900_000, "png", "http://h").rsplit("/", 1)[1]
    with pytest.raises(StoreFullError):
        store.put(b"n" * 400_000, "png", "http://h")
    time.sleep(0.35)
    new = store.put(b"n" * 400_000, "png", "http://h").rsplit("/", 1)[1]
    assert store.get(old) is None and store.get(new) is not None


def test_sweep_deletes_expired_and_stray_files(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path, ttl_seconds=0.2, max_bytes=1 << 30)
    store.put(b"x", "png", "http://h")
    time.sleep(0.3)
    keep = store.put(b"y", "png", "http://h").rsplit("/", 1)[1]
    store.sweep()
    assert [path.name for path in tmp_path.iterdir()] == [keep]


def test_names_are_unguessable() -> None:
    from sd35.storage import new_name

    names = {new_name("png") for _ in range(2000)}
    assert len(names) == 2000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}\.png", name) for name in names), "32 base64url chars = 192 bits"


# --- real servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto's) on a loopback port, with one bucket."""
    with moto_s3("sd35-images", **S3_CREDENTIALS) as endpoint:
        yield endpoint


S3_CREDENTIALS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.mark.server
def test_s3_store_hands_out_presigned_urls_that_any_client_fetches(
    tiny_model_dir: Path, tmp_path: Path, s3_endpoint: str
) -> None:
    env = {
        **S3_ENV,
        "MODEL_ID": str(tiny_model_dir),
        "API_KEY": KEY,
        "WARMUP": "false",
        "IMAGE_STORE": "s3",
        "IMAGE_STORE_S3_BUCKET": "sd35-images",
        "IMAGE_STORE_S3_PREFIX": "generated",
        "IMAGE_STORE_S3_ENDPOINT_URL": s3_endpoint,
        "IMAGE_TTL_SECONDS": "600",
    }
    with running_server(env, tmp_path) as server:
        body = {"prompt": "a crane", "size": "256x256", "n": 2, "response_format": "url", "output_format": "webp"}
        response = httpx.post(f"{server.url}/v1/images/generations", json={**body, **FAST}, headers=AUTH, timeout=60)
        assert response.status_code == 200, response.text
        with httpx.Client(timeout=30) as plain:
            for item in response.json()["data"]:
                url = item["url"]
                assert url.startswith(f"{s3_endpoint}/sd35-images/generated/") and ".webp?" in url
                assert "X-Amz-Expires=600" in url and "X-Amz-Signature=" in url
                image, fetched = fetch_image(plain, url)
                assert (image.format, image.size) == ("WEBP", (256, 256))
                assert fetched.headers["content-type"] == "image/webp"


@pytest.mark.server
def test_s3_sweep_deletes_only_its_own_expired_objects(s3_endpoint: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, **S3_CREDENTIALS)
    client.create_bucket(Bucket="shared-bucket")
    foreign = [
        "sweep-test/notes.txt",
        "sweep-test/backup/" + "A" * 32 + ".png",
        "sweep-test/" + "B" * 32 + ".gif",
        "sweep-test/" + "C" * 31 + ".png",
        "elsewhere/" + "D" * 32 + ".png",
        "E" * 32 + ".png",
    ]
    for key in foreign:  # someone else's, and as old as the expired image
        client.put_object(Bucket="shared-bucket", Key=key, Body=b"keep me")
    store = S3ImageStore("shared-bucket", "sweep-test/", ttl_seconds=1, client=client)
    store.put(b"old", "png", "")
    time.sleep(2.1)
    new = store.put(b"new", "png", "").split("?", 1)[0].rsplit("/", 1)[1]
    store.sweep()
    keys = {item["Key"] for item in client.list_objects_v2(Bucket="shared-bucket")["Contents"]}
    assert keys == {*foreign, f"sweep-test/{new}"}


@pytest.mark.server
def test_a_prefix_that_is_the_buckets_root_is_refused_at_start(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, **S3_CREDENTIALS)
    client.put_object(Bucket="sd35-images", Key="F" * 32 + ".png", Body=b"someone else's")
    env = {
        **os.environ,
        **S3_ENV,
        "BENTOML_HOME": str(tmp_path),
        "BENTOML_DO_NOT_TRACK": "true",
        "IMAGE_STORE": "s3",
        "IMAGE_STORE_S3_BUCKET": "sd35-images",
        "IMAGE_STORE_S3_ENDPOINT_URL": s3_endpoint,
        "IMAGE_TTL_SECONDS": "1",
        "IMAGE_STORE_S3_PREFIX": "/",
    }
    lines = failed_start(env, mentioning="IMAGE_STORE_S3_PREFIX")
    assert len(lines) == 1 and "must not be the bucket's root" in lines[0], lines
    assert client.get_object(Bucket="sd35-images", Key="F" * 32 + ".png")["Body"].read() == b"someone else's"
    with pytest.raises(ValueError, match="IMAGE_STORE_S3_PREFIX"):
        S3ImageStore("sd35-images", "", ttl_seconds=1, client=client)
