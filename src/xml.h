/* The XML of util.stanza trees in C (xml.c), exposed by core.c as core.serialize and core.parse. */
#ifndef OFFLINE_STORE_XML_H
#define OFFLINE_STORE_XML_H

#include <lua.h>

#include "backend.h"

OS_HIDDEN int os_xml_serialize(lua_State *L);
OS_HIDDEN int os_xml_parse(lua_State *L);

#endif
