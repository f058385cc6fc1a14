"""dPanel image builder: freeze the agent and bake it into SD card images."""
