"""A real MCP client (the Python SDK) against a Portico proxy endpoint.

Usage: PORTICO_TOKEN=... python py_client.py URL [--everything]
Connects in the SDK's default "auto" mode, which first probes
`server/discover` and falls back to initialize when the server answers
-32601 (method not found), then exercises tools, resources and prompts and
prints one JSON object with what it saw.
"""

import asyncio
import json
import os
import sys

from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def text_of(content):
    return "".join(getattr(c, "text", "") for c in content)


async def main(url: str, everything: bool) -> dict:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {os.environ['PORTICO_TOKEN']}"})
    async with http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode="auto") as client:
            out = {
                "server_name": client.server_info.name if client.server_info else None,
                "protocol_version": client.protocol_version,
            }
            tools = await client.list_tools()
            out["tools"] = sorted(t.name for t in tools.tools)
            if everything:
                res = await client.call_tool("echo", {"message": "hi from python"})
                out["echo"] = text_of(res.content)
                out["resources"] = len((await client.list_resources()).resources)
                out["prompts"] = len((await client.list_prompts()).prompts)
                return out
            res = await client.call_tool("echo", {"message": "hi from python"})
            out["echo"] = text_of(res.content)
            try:
                denied = await client.call_tool("delete_everything", {})
                out["denied"] = "not denied: " + text_of(getattr(denied, "content", []) or [])
            except Exception as e:  # the gateway answers with a JSON-RPC error
                out["denied"] = str(e)
            out["resources"] = [r.uri for r in (await client.list_resources()).resources]
            read = await client.read_resource("test://hello")
            out["resource"] = "".join(getattr(c, "text", "") for c in read.contents)
            out["prompts"] = [p.name for p in (await client.list_prompts()).prompts]
            prompt = await client.get_prompt("greet", {"name": "py"})
            out["prompt"] = prompt.messages[0].content.text
            return out


def leaves(e: BaseException) -> list[BaseException]:
    """The real errors inside anyio's task-group ExceptionGroups."""
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in leaves(sub)]
    return [e]


if __name__ == "__main__":
    try:
        result = asyncio.run(main(sys.argv[1], "--everything" in sys.argv[2:]))
    except Exception as e:  # report, do not trace
        for leaf in leaves(e):
            print(f"py_client: {type(leaf).__name__}: {leaf}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result))
