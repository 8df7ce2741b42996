#!/usr/bin/python3
"""Writes a one-layer OCI image archive (for `ctr images import`) offline.

The sandbox ("pause") image of the containerd CRI test: no registry is
reachable, so the image is made here from a static busybox.

    oci_image.py --busybox /bin/busybox --name localhost/x/pause:1 --out pause.tar

The layer holds /bin/busybox and a few empty directories; the entrypoint is
`/bin/busybox sleep 2147483647`. The index names the image with the
annotation `io.containerd.image.name`, which `ctr images import` uses as the
full image name.
"""

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import tarfile

# Go's GOARCH names, which OCI uses, for the machine names Python reports.
ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
          "s390x": "s390x", "riscv64": "riscv64"}


def add_bytes(tar, name, data, mode=0o644):
    """Adds a regular file with fixed metadata (reproducible archives)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar, name, mode=0o755):
    """Adds a directory entry."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = 0
    tar.addfile(info)


def layer(busybox):
    """The uncompressed layer tarball."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp"):
            add_dir(tar, d, 0o1777 if d == "tmp" else 0o755)
        with open(busybox, "rb") as f:
            add_bytes(tar, "bin/busybox", f.read(), 0o755)
    return buf.getvalue()


def descriptor(media_type, data, **extra):
    """An OCI content descriptor for data."""
    d = {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
         "size": len(data)}
    d.update(extra)
    return d


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busybox", required=True, help="a static busybox binary")
    parser.add_argument("--name", required=True, help="the full image name")
    parser.add_argument("--out", required=True, help="the archive to write")
    args = parser.parse_args()

    arch = ARCHES.get(platform.machine())
    if arch is None:
        print("unknown machine %r" % platform.machine(), file=sys.stderr)
        return 1
    layer_tar = layer(args.busybox)
    layer_desc = descriptor("application/vnd.oci.image.layer.v1.tar", layer_tar)
    config = json.dumps({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/busybox", "sleep", "2147483647"],
            "WorkingDir": "/",
            "Env": ["PATH=/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        "history": [{"created_by": "netns-tests/cri/oci_image.py"}],
    }, sort_keys=True).encode()
    config_desc = descriptor("application/vnd.oci.image.config.v1+json", config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }, sort_keys=True).encode()
    tag = args.name.rsplit(":", 1)[1] if ":" in args.name.rsplit("/", 1)[-1] else "latest"
    manifest_desc = descriptor(
        "application/vnd.oci.image.manifest.v1+json", manifest,
        platform={"architecture": arch, "os": "linux"},
        annotations={"io.containerd.image.name": args.name,
                     "org.opencontainers.image.ref.name": tag},
    )
    index = json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]},
                       sort_keys=True).encode()

    tmp = args.out + ".part"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes(tar, "index.json", index)
        add_dir(tar, "blobs")
        add_dir(tar, "blobs/sha256")
        for blob in (layer_tar, config, manifest):
            add_bytes(tar, "blobs/sha256/" + hashlib.sha256(blob).hexdigest(), blob)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
