"""The gateway's pure core: routing tables, key checks, error bodies, request/response rewriting,
SSE framing and adapter-file checks. Nothing here imports httpx, fastapi, asyncio or touches files,
so every rule is testable with plain values."""
