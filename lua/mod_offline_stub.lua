-- mod_offline_stub: accept messages to offline users and drop them silently, with no
-- storage and no error to the sender (the seed's mod_offline_stub), for servers where
-- mod_mam keeps the copy. Load it instead of mod_offline: modules_disabled = { "offline" }.

local accepted = { chat = true, normal = true }

module:hook("message/offline/handle", function(event)
	local stanza = event.stanza
	if stanza and accepted[stanza.attr.type or "normal"] then
		module:log("debug", "Dropping offline message to %s (mod_offline_stub)", stanza.attr.to or "?")
		return true
	end
end, -1.5)
