#!/usr/bin/env python3
"""The protocol floor: the same socketserver.ThreadingTCPServer as pcc,
reading Postfix policy requests and answering DUNNO without doing anything.
Usage: floor.py PORT"""
import socketserver
import sys


class FloorHandler(socketserver.StreamRequestHandler):
    def handle(self):
        in_request = False
        for line in self.rfile:
            if line.strip():
                in_request = True
            elif in_request:
                self.wfile.write(b"action=DUNNO\n\n")
                in_request = False


class FloorServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


if __name__ == "__main__":
    with FloorServer(("127.0.0.1", int(sys.argv[1])), FloorHandler) as server:
        server.serve_forever()
