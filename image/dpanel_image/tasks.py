"""invoke tasks for freezing the agent and building/provisioning images."""

from invoke import Collection

agent_ns = Collection("agent")
image_ns = Collection("image")
