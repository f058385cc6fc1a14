"""Deploy the dPanel server appliance (tunnel, manager, broker) onto a Debian host."""
