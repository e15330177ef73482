"""gRPC server reflection (``grpc.reflection.v1alpha.ServerReflection``).

Generic tools (grpcurl, grpcio-reflection's descriptor database) ask which
services we serve and for the .proto files that define them; the answers come
from the default protobuf descriptor pool, where our generated modules put
their files when imported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from prism.errors import StatusCode
from prism.rpc.call import CallContext

SERVICE = rpb.DESCRIPTOR.services_by_name["ServerReflection"]


def _with_dependencies(fd: FileDescriptor) -> list[bytes]:
    seen: dict[str, FileDescriptor] = {}
    todo = [fd]
    while todo:
        f = todo.pop()
        if f.name not in seen:
            seen[f.name] = f
            todo.extend(f.dependencies)
    out = []
    for f in seen.values():
        proto = descriptor_pb2.FileDescriptorProto()
        f.CopyToProto(proto)
        out.append(proto.SerializeToString())
    return out


class Reflection:
    """Answers each reflection request on the stream as it arrives."""

    def __init__(self, service_names: list[str]) -> None:
        self._names = sorted(service_names)
        self._pool = descriptor_pool.Default()

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[rpb.ServerReflectionRequest], call: CallContext
    ) -> AsyncIterator[rpb.ServerReflectionResponse]:
        async for request in requests:
            yield self._answer(request)

    def _answer(self, request: rpb.ServerReflectionRequest) -> rpb.ServerReflectionResponse:
        which = request.WhichOneof("message_request")
        response = rpb.ServerReflectionResponse(valid_host=request.host, original_request=request)
        try:
            if which == "list_services":
                response.list_services_response.service.extend(
                    rpb.ServiceResponse(name=n) for n in self._names
                )
            elif which == "file_by_filename":
                fd = self._pool.FindFileByName(request.file_by_filename)
                response.file_descriptor_response.file_descriptor_proto.extend(_with_dependencies(fd))
            elif which == "file_containing_symbol":
                fd = self._pool.FindFileContainingSymbol(request.file_containing_symbol)
                response.file_descriptor_response.file_descriptor_proto.extend(_with_dependencies(fd))
            elif which == "file_containing_extension":
                ext = request.file_containing_extension
                message = self._pool.FindMessageTypeByName(ext.containing_type)
                extension = self._pool.FindExtensionByNumber(message, ext.extension_number)
                fd = self._pool.FindFileContainingSymbol(extension.full_name)
                response.file_descriptor_response.file_descriptor_proto.extend(_with_dependencies(fd))
            elif which == "all_extension_numbers_of_type":
                message = self._pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(e.number for e in self._pool.FindAllExtensions(message))
                response.all_extension_numbers_response.base_type_name = message.full_name
                response.all_extension_numbers_response.extension_number.extend(numbers)
            else:
                response.error_response.error_code = StatusCode.INVALID_ARGUMENT
                response.error_response.error_message = "empty reflection request"
        except KeyError as exc:
            response.ClearField("message_response")
            response.error_response.error_code = StatusCode.NOT_FOUND
            response.error_response.error_message = f"not found: {exc}"
        return response
