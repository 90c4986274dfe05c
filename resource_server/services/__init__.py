"""Services: the gateway's work and side effects, named <entity>_<action>."""
