"""switchyard's gateway: the OpenAI-compatible front door, routing stable model names to LoRA
adapters on a base engine or to merged engines.

The Python API the deploy package builds on (importing this package itself stays cheap):

    gateway.core.routing   Route, RoutingTable (immutable), config_routes(config)
    gateway.service        Gateway: table / set_route / replace_table / add_upstream / remove_upstream /
                           in_flight / drain / load_adapter / unload_adapter / check_health
    gateway.app            create_app(settings, gateway=None, extra_routers=())
    gateway.auth           require_admin (a FastAPI dependency for extra admin routes)
    gateway.settings       load_settings(config, **overrides) -> GatewaySettings (SWITCHYARD_* env)
    gateway.adapters       inspect_adapter(path, root=..., base=..., max_lora_rank=...) before vLLM sees it
    gateway.core.errors    the exception tree (GatewayError and its OpenAI-style bodies)
    gateway.canned         a canned upstream for fast proxy tests and the overhead benchmark
"""
