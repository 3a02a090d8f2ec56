"""Serving fastdiff over HTTP: one process (FastAPI + uvicorn) or Ray Serve replicas.

    from fastdiff.serving import create_app     # a FastAPI app over a Pipeline or Engine
    fastdiff serve --model small                # the same app under uvicorn on 127.0.0.1:8000
    serve run fastdiff.serving:app              # Ray Serve's application builder

Needs the `serve` extra (pip install 'fastdiff[serve]'). Ray is imported only by `app`.
"""
from fastdiff.serving.server import Limits, create_app, load_pipelines, serve_forever

__all__ = ["Limits", "app", "create_app", "load_pipelines", "serve_forever"]


def app(args: dict):
    """Ray Serve application builder (see fastdiff.serving.ray_serve.app); Ray is imported here."""
    from fastdiff.serving import ray_serve

    return ray_serve.app(args)
