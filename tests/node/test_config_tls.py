"""``ekko cluster init --tls`` writes a CA and node key pairs the config names; the config
checks them once, when read, naming the field and the file of each problem."""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import tomllib
from pathlib import Path

import pytest
import tomli_w
from cryptography import x509

from ekko.node.config import ConfigError, load_config
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.cluster_tls import Authority, write_private


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_cluster(cluster_doc(dcs=1, replicas=2, tls=True), tmp_path / "cluster.toml")


def test_init_writes_a_ca_and_a_key_pair_per_node_that_the_config_names(config: Path) -> None:
    cfg = load_config(config)
    base = config.parent
    assert cfg.cluster.tls is not None and cfg.cluster.tls.ca == "tls/ca.crt"
    for node in cfg.nodes:
        load_config(config, node=node.name)  # every node's files pass the check
        files = cfg.tls_files(base, node.name)
        assert files is not None and files.cert is not None and files.key is not None
        assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(san.get_values_for_type(x509.DNSName)) == {node.name, "localhost"}
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert stat.S_IMODE((base / "tls" / "ca.key").stat().st_mode) == 0o600


def test_init_again_keeps_the_ca_so_issued_certificates_stay_valid(config: Path) -> None:
    ca = (config.parent / "tls" / "ca.crt").read_bytes()
    write_cluster(cluster_doc(dcs=1, replicas=2, tls=True), config)
    assert (config.parent / "tls" / "ca.crt").read_bytes() == ca
    load_config(config, node="dc1-r0")


def _refused(config: Path, node: str | None, *parts: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(config, node=node)
    for part in parts:
        assert part in str(err.value), str(err.value)


def test_a_missing_ca_is_named(config: Path) -> None:
    (config.parent / "tls" / "ca.crt").unlink()
    _refused(config, None, "cluster.tls.ca:", "ca.crt: no such file")


def test_a_file_that_is_no_certificate_is_named(config: Path) -> None:
    (config.parent / "tls" / "dc1-r0.crt").write_text("hello")
    _refused(config, "dc1-r0", "nodes[dc1-r0].tls.cert:", "dc1-r0.crt: not a PEM certificate")
    load_config(config, node="dc1-r1")  # another node's files are its own business


def test_an_unreadable_key_is_named(config: Path) -> None:
    key = config.parent / "tls" / "dc1-r0.key"
    key.unlink()
    key.mkdir()  # unreadable whoever we run as (root reads a mode-000 file)
    _refused(config, "dc1-r0", "nodes[dc1-r0].tls.key:", "dc1-r0.key: cannot read it")


@pytest.mark.parametrize("field", ["ca", "cert", "key"])
def test_an_endless_huge_or_pipe_file_is_named_without_reading_it_whole(
    config: Path, tmp_path: Path, field: str
) -> None:
    huge = tmp_path / "huge.pem"
    with open(huge, "wb") as f:
        f.truncate(64 << 20)  # sparse: no disk used, but read whole it is 64 MiB of memory
    text = config.read_text()
    line = {"ca": 'ca = "tls/ca.crt"', "cert": 'cert = "tls/dc1-r0.crt"'}
    line["key"] = 'key = "tls/dc1-r0.key"'
    named = "cluster.tls.ca:" if field == "ca" else f"nodes[dc1-r0].tls.{field}:"
    for path in (huge, Path("/dev/zero")):  # /dev/zero never ends: a read of all is OOM
        config.write_text(text.replace(line[field], f'{field} = "{path}"'))
        _refused(config, "dc1-r0", named, f"{path}: larger than 1048576 bytes: not a PEM file")
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)  # no writer: a blocking open waited forever, the node never started
    config.write_text(text.replace(line[field], f'{field} = "{fifo}"'))
    _refused(config, "dc1-r0", named, f"{fifo}: not ")


def test_a_key_of_another_certificate_is_named(config: Path) -> None:
    tls = config.parent / "tls"
    shutil.copy(tls / "dc1-r1.key", tls / "dc1-r0.key")
    _refused(config, "dc1-r0", "nodes[dc1-r0].tls.key:", "mismatched key and certificate")


def test_a_certificate_from_another_ca_is_named(config: Path) -> None:
    tls = config.parent / "tls"
    cert, key = Authority.create("other").issue("dc1-r0")
    write_private(tls / "dc1-r0.key", key)
    (tls / "dc1-r0.crt").write_bytes(cert)
    _refused(config, "dc1-r0", "nodes[dc1-r0].tls.cert:", "is not signed by the cluster CA")


def test_a_certificate_issued_to_another_node_is_named(config: Path) -> None:
    _rewrite(config, lambda doc: doc["nodes"][1].update(tls=doc["nodes"][0]["tls"]))
    _refused(config, "dc1-r0", "nodes[dc1-r0].tls.cert:", "issued to 'source', not to node")


def _rewrite(config: Path, change) -> None:
    doc = tomllib.loads(config.read_text())
    change(doc)
    config.write_text(tomli_w.dumps(doc))


def test_every_node_needs_its_files_when_tls_is_on(config: Path) -> None:
    _rewrite(config, lambda doc: doc["nodes"][1].pop("tls"))
    _refused(config, None, "nodes[dc1-r0].tls: required when cluster.tls is set")


def test_node_files_without_a_ca_are_refused(config: Path) -> None:
    _rewrite(config, lambda doc: doc["cluster"].pop("tls"))
    _refused(config, None, "nodes[source].tls: set, but cluster.tls (the CA) is not")
