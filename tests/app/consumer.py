"""A second Serve application that uses the GPT-J app only through its Python handle."""

from ray import serve

from app.schemas import CompletionRequest


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Consumer:
    def __init__(self, app_name: str):
        self._gptj = serve.get_app_handle(app_name)  # in __init__, not at import time

    async def complete(self, request: CompletionRequest) -> str:
        response = await self._gptj.generate.remote(request)
        return response.choices[0].text

    async def complete_streamed(self, request: CompletionRequest) -> list[str]:
        """The text of each streamed chunk, in order."""
        pieces = []
        async for chunk in self._gptj.generate_stream.options(stream=True).remote(request):
            pieces += [choice.text for choice in chunk.choices]
        return pieces
