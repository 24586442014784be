"""Reference-client conformance: python-tuf's ngclient refreshes Portcullis's firmware
repository from a trusted root.json over mTLS and downloads one target.

usage: tuf_ngclient.py BASE_URL CA_PEM CERT_CHAIN_PEM KEY_PEM ROOT_JSON TARGET WORKDIR

Prints one JSON line: the trusted versions of each role and the target's length and
sha256 as ngclient verified them. Exits non-zero on any TUF error.
"""

import hashlib
import json
import os
import shutil
import sys

import urllib3
from tuf.ngclient import FetcherInterface, Updater
from tuf.api import exceptions


class MtlsFetcher(FetcherInterface):
    def __init__(self, ca, cert, key):
        self.pool = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED", ca_certs=ca, cert_file=cert, key_file=key, retries=False
        )

    def _fetch(self, url):
        r = self.pool.request("GET", url, preload_content=False, timeout=10)
        if r.status != 200:
            r.release_conn()
            raise exceptions.DownloadHTTPError(f"HTTP {r.status} for {url}", r.status)
        return r.stream(64 * 1024)


def main():
    base, ca, cert, key, root, target, work = sys.argv[1:8]
    meta_dir = os.path.join(work, "metadata")
    dl_dir = os.path.join(work, "targets")
    for d in (meta_dir, dl_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    with open(root, "rb") as f:
        anchor = f.read()
    updater = Updater(
        metadata_dir=meta_dir,
        metadata_base_url=f"{base}/firmware/metadata/",
        target_base_url=f"{base}/firmware/targets/",
        target_dir=dl_dir,
        fetcher=MtlsFetcher(ca, cert, key),
        bootstrap=anchor,
    )
    updater.refresh()
    info = updater.get_targetinfo(target)
    if info is None:
        raise SystemExit(f"target {target} not found by ngclient")
    path = updater.download_target(info)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    trusted = updater._trusted_set  # versions for the report only
    print(json.dumps({
        "root": trusted.root.version,
        "timestamp": trusted.timestamp.version,
        "snapshot": trusted.snapshot.version,
        "targets": trusted.targets.version,
        "length": info.length,
        "sha256": digest,
        "custom": info.custom,
    }))


if __name__ == "__main__":
    main()
