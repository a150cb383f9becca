/* The XML of util.stanza trees in C (xml.c), exposed by core.c as core.serialize,
 * core.parse and core.delay. */
#ifndef OFFLINE_STORE_XML_H
#define OFFLINE_STORE_XML_H

#include <lua.h>

#include "backend.h"

OS_HIDDEN int os_xml_serialize(lua_State *L);
/* Serialises the util.stanza tree at idx (as core.serialize does) into a buffer
 * kept per Lua state. Returns 0 with *p, *n set, valid until the next call, or -1
 * when the tree is deeper than the C serializer goes; raises on a malformed tree
 * or out of memory. */
OS_HIDDEN int os_xml_write(lua_State *L, int idx, int skip_delays, const char **p, size_t *n);
OS_HIDDEN int os_xml_parse(lua_State *L);
OS_HIDDEN int os_xml_delay(lua_State *L);

#endif
