#!/usr/bin/python3
"""A minimal CRI client (runtime.v1.RuntimeService, pod sandboxes only).

Stands in for crictl (not packaged in Debian bookworm) in the containerd CRI
test. Runs on Debian's python3 with python3-grpcio. The gRPC stubs are
generated from api.proto (next to this file) beforehand:

    python3 -m grpc_tools.protoc -I <this dir> --python_out=DIR \
        --grpc_python_out=DIR api.proto

Usage:

    cri_client.py --stubs DIR --socket PATH [--timeout SECONDS] COMMAND ...

    version             the runtime's name and versions
    run POD_JSON        RunPodSandbox; prints {"id": ...}
    status ID           PodSandboxStatus (verbose); prints state, IPs, the
                        network namespace path and the CNI result
    stop ID             StopPodSandbox
    remove ID           RemovePodSandbox
    list                ListPodSandbox; prints [{id, name, namespace, ...}]

POD_JSON: {"name", "namespace", "uid", "attempt", "hostname",
"port_mappings": [{"protocol": "TCP", "container_port", "host_port",
"host_ip"}], "labels": {...}, "annotations": {...}, "cgroup_parent"}.

Every command prints one JSON document on stdout and exits 0; a gRPC error
is printed to stderr as "grpc error CODE: DETAILS" with exit status 2.
"""

import argparse
import json
import sys


def load_stubs(stubs_dir):
    """Imports the generated api_pb2 and api_pb2_grpc modules from stubs_dir."""
    sys.path.insert(0, stubs_dir)
    import api_pb2  # noqa: E402 (generated at test time)
    import api_pb2_grpc  # noqa: E402

    return api_pb2, api_pb2_grpc


def pod_config(pb, spec):
    """The PodSandboxConfig for a POD_JSON dictionary."""
    meta = pb.PodSandboxMetadata(
        name=spec["name"],
        namespace=spec.get("namespace", "default"),
        uid=spec["uid"],
        attempt=int(spec.get("attempt", 0)),
    )
    ports = []
    for p in spec.get("port_mappings", []):
        ports.append(
            pb.PortMapping(
                protocol=pb.Protocol.Value(p.get("protocol", "TCP").upper()),
                container_port=int(p["container_port"]),
                host_port=int(p.get("host_port", 0)),
                host_ip=p.get("host_ip", ""),
            )
        )
    return pb.PodSandboxConfig(
        metadata=meta,
        hostname=spec.get("hostname", spec["name"]),
        port_mappings=ports,
        labels=spec.get("labels", {}),
        annotations=spec.get("annotations", {}),
        linux=pb.LinuxPodSandboxConfig(cgroup_parent=spec.get("cgroup_parent", "")),
    )


def metadata_dict(meta):
    """A PodSandboxMetadata as a dictionary."""
    return {
        "name": meta.name,
        "namespace": meta.namespace,
        "uid": meta.uid,
        "attempt": meta.attempt,
    }


def status_dict(pb, resp):
    """The interesting parts of a verbose PodSandboxStatusResponse."""
    st = resp.status
    out = {
        "id": st.id,
        "state": pb.PodSandboxState.Name(st.state),
        "metadata": metadata_dict(st.metadata),
        "ip": st.network.ip,
        "additional_ips": [x.ip for x in st.network.additional_ips],
        "netns": None,
        "pid": None,
        "cni_result": None,
        "info_keys": sorted(resp.info.keys()),
    }
    raw = resp.info.get("info")
    if raw:
        info = json.loads(raw)
        out["pid"] = info.get("pid")
        out["cni_result"] = info.get("cniResult")
        spec = info.get("runtimeSpec") or {}
        for ns in (spec.get("linux") or {}).get("namespaces") or []:
            if ns.get("type") == "network":
                out["netns"] = ns.get("path")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stubs", required=True, help="directory of api_pb2*.py")
    parser.add_argument("--socket", required=True, help="the CRI gRPC unix socket")
    parser.add_argument("--timeout", type=float, default=30.0, help="RPC deadline (s)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version")
    sub.add_parser("list")
    p = sub.add_parser("run")
    p.add_argument("pod_json")
    for name in ("status", "stop", "remove"):
        p = sub.add_parser(name)
        p.add_argument("id")
    args = parser.parse_args()

    pb, pb_grpc = load_stubs(args.stubs)
    import grpc

    channel = grpc.insecure_channel("unix://" + args.socket)
    rt = pb_grpc.RuntimeServiceStub(channel)
    t = args.timeout
    try:
        if args.command == "version":
            r = rt.Version(pb.VersionRequest(version="v1"), timeout=t)
            out = {
                "version": r.version,
                "runtime_name": r.runtime_name,
                "runtime_version": r.runtime_version,
                "runtime_api_version": r.runtime_api_version,
            }
        elif args.command == "run":
            spec = json.loads(args.pod_json)
            req = pb.RunPodSandboxRequest(config=pod_config(pb, spec))
            r = rt.RunPodSandbox(req, timeout=t)
            out = {"id": r.pod_sandbox_id}
        elif args.command == "status":
            req = pb.PodSandboxStatusRequest(pod_sandbox_id=args.id, verbose=True)
            out = status_dict(pb, rt.PodSandboxStatus(req, timeout=t))
        elif args.command == "stop":
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=args.id), timeout=t)
            out = {"stopped": args.id}
        elif args.command == "remove":
            rt.RemovePodSandbox(
                pb.RemovePodSandboxRequest(pod_sandbox_id=args.id), timeout=t
            )
            out = {"removed": args.id}
        elif args.command == "list":
            r = rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=t)
            out = [
                dict(
                    id=x.id,
                    state=pb.PodSandboxState.Name(x.state),
                    **metadata_dict(x.metadata),
                )
                for x in r.items
            ]
        else:
            parser.error("unknown command " + args.command)
    except grpc.RpcError as e:
        print("grpc error %s: %s" % (e.code().name, e.details()), file=sys.stderr)
        return 2
    finally:
        channel.close()
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
