"""Certificates, TLS and authorization, shared by the agent and control."""
