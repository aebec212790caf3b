#!/usr/bin/env python3
"""Prints the first of N consecutive TCP ports (default 25) that are all free on 127.0.0.1 now, for
tests that start ranks which meet at MASTER_PORT, MASTER_PORT+1, ... Below the kernel's ephemeral
range (32768 and up on Linux), which outgoing connections draw from; a random block, so that tests
running at once rarely pick the same one."""
import random
import socket
import sys


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 25
    for _ in range(500):
        base = random.randrange(20000, 32000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        print(base)
        return 0
    print("free_ports: no block of free ports found", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
