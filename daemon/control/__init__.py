"""The control socket: its server (access, protocol) and the commands it runs."""
