"""A TCP proxy in front of a real broker that can corrupt one large PUBLISH in transit.

It parses the client-to-broker byte stream into MQTT packets (fixed header +
remaining length) and flips the last byte of the first PUBLISH packet larger
than ``corrupt_over`` bytes: the broker and the receiver see a well-formed
packet whose payload is damaged, as a faulty link or a buggy relay would deliver.
"""

from __future__ import annotations

import socket
import threading


class CorruptingProxy:
    def __init__(self, upstream_port: int, corrupt_over: int = 100_000) -> None:
        self.upstream_port = upstream_port
        self.corrupt_over = corrupt_over
        self.corrupted = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._client_to_broker, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def _client_to_broker(self, src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray()
        try:
            while data := src.recv(65536):
                buf += data
                while (packet := _take_packet(buf)) is not None:
                    dst.sendall(self._maybe_corrupt(packet))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def _maybe_corrupt(self, packet: bytearray) -> bytearray:
        with self._lock:
            if packet[0] >> 4 == 3 and len(packet) > self.corrupt_over and not self.corrupted:
                self.corrupted += 1
                packet[-1] ^= 0xFF
        return packet


def _take_packet(buf: bytearray) -> bytearray | None:
    """Pop one whole MQTT packet off the front of ``buf``, or None if incomplete."""
    length, mult, i = 0, 1, 1
    while True:
        if i >= len(buf):
            return None
        byte = buf[i]
        length += (byte & 0x7F) * mult
        mult *= 128
        i += 1
        if not byte & 0x80:
            break
    if len(buf) < i + length:
        return None
    packet = buf[: i + length]
    del buf[: i + length]
    return packet
