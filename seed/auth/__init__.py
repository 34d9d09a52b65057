"""Identity: who is asking. Identity providers (htpasswd, LDAP/AD, robot accounts), the
seed's token service (JWT, JWKS), brute-force throttling.

Authorization (what a principal may do) is decided in one place, ``seed.access``.
"""
