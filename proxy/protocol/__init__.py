"""Sans-I/O protocol machines: no sockets, no trio, no clock, no logging in here."""
