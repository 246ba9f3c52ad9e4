"""docs/examples/nginx-cluster.conf against a real nginx and three real
nodes: clients spread over the nodes chat as one room, and a node that is
killed is skipped for new clients."""

from __future__ import annotations


import pytest
import trio


from tests.cluster_helpers import cluster, redis_server  # noqa: F401
from tests.conftest import GUARD, Peer, free_port, open_websocket_url
from tests.pg import pg_run_database, pg_url  # noqa: F401
from tests.nginx import EXAMPLES, Nginx

EXAMPLE = EXAMPLES / "nginx-cluster.conf"


@pytest.fixture
def nginx_cluster(tmp_path):
    runner = Nginx(tmp_path)

    def start(ports: list[int]) -> int:
        port = free_port()
        site = EXAMPLE.read_text().replace("listen 8080;", f"listen 127.0.0.1:{port};")
        for example_port, node_port in zip((8765, 8766, 8767), ports, strict=True):
            site = site.replace(f"127.0.0.1:{example_port}", f"127.0.0.1:{node_port}")
        runner.start(site)
        return port

    yield start
    runner.stop()


async def listening(port: int) -> None:
    with trio.fail_after(GUARD):
        while True:
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                return
            except OSError:
                await trio.sleep(0.05)  # nginx is still binding its port


async def through(nursery, port: int, name: str) -> Peer:
    async def run(*, task_status=trio.TASK_STATUS_IGNORED):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/socialvp") as ws:
            task_status.started(ws)
            await trio.sleep_forever()

    peer = Peer(await nursery.start(run))
    assert (await peer.recv())["type"] == "init"
    await peer.send({"command": "identify", "name": name})
    assert (await peer.recv())["code"] == 300
    return peer


async def test_clients_through_nginx_spread_over_the_nodes_and_chat_as_one(
        cluster, nginx_cluster, nursery):
    nodes = await cluster.nodes_up("n1", "n2", "n3", **{"trusted-proxies": ["127.0.0.1"]})
    port = nginx_cluster([node.port for node in nodes])
    await listening(port)
    peers = [await through(nursery, port, f"user{i}") for i in range(6)]
    for node in nodes:  # least_conn: every node got clients
        assert "authenticated on /socialvp" in node.output()
    await peers[0].send({"command": "broadcast", "message": "to all nodes"})
    for peer in peers[1:]:
        while (frame := await peer.recv())["type"] != "broadcast":
            pass
        assert frame == {"type": "broadcast", "from": "user0", "message": "to all nodes"}
    nodes[2].kill9()
    late = [await through(nursery, port, f"late{i}") for i in range(3)]  # n3 is skipped
    await late[0].send({"command": "broadcast", "message": "still one room"})
    while (frame := await peers[1].recv())["type"] != "broadcast":
        pass
    assert frame["message"] == "still one room"
