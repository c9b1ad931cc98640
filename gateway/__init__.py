"""The gateway: Litestar app, request pipeline, audit log, auth, settings and CLI."""
