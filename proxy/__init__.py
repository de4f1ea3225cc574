"""xoauth2-proxy: a SASL XOAUTH2 proxy for IMAP, POP3 and SMTP."""
