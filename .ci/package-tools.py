#!/usr/bin/python3
"""What .ci/debian-package needs besides the shell, with Debian 13's own
python3 and drivers (the package's dependencies, not the venv's):

  package-tools.py sink FILE PORT             an SMTP listener appending each message's data to FILE
  package-tools.py crossing LOGIN             four countries' requests; the fourth must be refused
  package-tools.py unblocked LOGIN            wait until LOGIN's request is answered DUNNO again
  package-tools.py fresh-database postgresql|mariadb   (re)make the database pcc_package
"""
import socket
import socketserver
import sys
import time

POLICY_PORT = 9999
# GB, US, NL, JP in DB-IP's data: the fourth country crosses the shipped threshold (3).
FOUR_COUNTRIES = ("81.2.69.160", "8.8.8.8", "2001:67c:2e8::1", "2001:200::1")


def ask(login: str, address: str) -> str:
    for _ in range(150):
        try:
            with socket.create_connection(("127.0.0.1", POLICY_PORT), timeout=5) as connection:
                connection.sendall(f"request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username={login}\n"
                                   f"client_address={address}\n\n".encode())
                return connection.makefile().readline().strip()
        except ConnectionRefusedError:
            time.sleep(0.2)
    sys.exit(f"the daemon never listened on 127.0.0.1:{POLICY_PORT}")


def crossing(login: str) -> None:
    answers = [ask(login, address) for address in FOUR_COUNTRIES]
    print(answers)
    if answers[:3] != ["action=DUNNO"] * 3 or not answers[3].startswith("action=HOLD "):
        sys.exit(f"the fourth country was not refused: {answers}")


def unblocked(login: str) -> None:
    for _ in range(50):
        if ask(login, FOUR_COUNTRIES[0]) == "action=DUNNO":
            return
        time.sleep(0.1)
    sys.exit(f"{login} is still refused after its unblock")


def sink(path: str, port: int) -> None:
    class Sink(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"220 sink\r\n")
            data, lines = False, []
            for line in self.rfile:
                if data and line == b".\r\n":
                    with open(path, "ab") as mailbox:
                        mailbox.write(b"".join(lines))
                    data, lines = False, []
                    self.wfile.write(b"250 ok\r\n")
                elif data:
                    lines.append(line)
                elif line[:4].upper() == b"DATA":
                    data = True
                    self.wfile.write(b"354 go\r\n")
                elif line[:4].upper() == b"QUIT":
                    self.wfile.write(b"221 bye\r\n")
                    return
                else:
                    self.wfile.write(b"250 ok\r\n")

    socketserver.TCPServer.allow_reuse_address = True
    with socketserver.TCPServer(("127.0.0.1", port), Sink) as server:
        server.serve_forever()


def fresh_database(kind: str) -> None:
    if kind == "postgresql":
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as connection:
            connection.execute("DROP DATABASE IF EXISTS pcc_package")
            connection.execute("CREATE DATABASE pcc_package")
        return
    import pymysql

    connection = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="")
    with connection.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS pcc_package")
        cursor.execute("CREATE DATABASE pcc_package")
    connection.close()


if __name__ == "__main__":
    command, arguments = sys.argv[1], sys.argv[2:]
    if command == "sink":
        sink(arguments[0], int(arguments[1]))
    elif command == "crossing":
        crossing(arguments[0])
    elif command == "unblocked":
        unblocked(arguments[0])
    elif command == "fresh-database":
        fresh_database(arguments[0])
    else:
        sys.exit(__doc__)
