"""invoke tasks for the server appliance."""

from invoke import Collection

server_ns = Collection("server")
