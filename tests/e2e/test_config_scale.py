"""A config with thousands of namespaces, as an operator runs it: ``prism
serve`` starts, routes to any of them, and reloads. (Each worker's spec was
once one environment variable: 1,000 namespaces failed execve with E2BIG.)"""

from __future__ import annotations

import signal

import grpc

from tests.e2e.conftest import PrismTree, get, put, tenant_toml, wait_until

PER_TENANT = 1500  # 3,000 namespaces: a spec of several hundred KB, over execve's 128 KiB per string


def body(extra: str = "") -> str:
    tenants = []
    for t in ("a", "b"):
        names = [f"{t}{i}" for i in range(PER_TENANT)] + ([extra] if t == "b" and extra else [])
        tenants.append(tenant_toml(t, [f'{{ name = "{n}", backend = "memory" }}' for n in names]))
    return "".join(tenants)


def answers(tree: PrismTree, namespace: str) -> bool:
    try:
        get(tree.kv(), namespace, "r", timeout=2)
    except grpc.RpcError:
        return False
    return True


def test_thousands_of_namespaces_start_route_and_reload(prism_tree) -> None:
    tree: PrismTree = prism_tree(body())
    stub = tree.kv()
    for namespace in ("a0", f"a{PER_TENANT - 1}", f"b{PER_TENANT - 1}"):
        put(stub, namespace, "r", b"k", namespace.encode())
        assert get(stub, namespace, "r") == {b"k": namespace.encode()}

    tree.write_config(body(extra="added"))
    tree.send_signal(signal.SIGHUP)

    wait_until(lambda: answers(tree, "added"), 20.0, what="the namespace the reload added answers")
    assert get(stub, f"b{PER_TENANT - 1}", "r") == {b"k": f"b{PER_TENANT - 1}".encode()}  # kept its data
